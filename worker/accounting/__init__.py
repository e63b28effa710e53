"""Who a job belongs to and what it cost: tenant names and limit keys (``tenancy``), prices and
exact cost (``pricing``), and the per-tenant usage counters read back (``usage``). Pure but for
``usage``'s reads; producers, workers and the gateway share them."""
