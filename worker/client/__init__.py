"""Producers: submit jobs and read their events and results. Imports no Celery.

:mod:`~worker.client.sync` (``Client``, ``Job``) and :mod:`~worker.client.aio`
(``AsyncClient``, ``AsyncJob``) share their pure core, :mod:`~worker.client.core`;
batch files (:mod:`~worker.client.batch_file`, :mod:`~worker.client.batch_run`) and dead
letters (:mod:`~worker.client.dead_letters`) are built on them. Import the public names from
``worker``.
"""
