"""The chart's gateway keys file, as a Kubernetes Secret volume delivers it, against a real
gateway process and Redis: the kubelet never rewrites the file in place, it swaps a symlink
(`..data`) to a new directory, and the gateway must see that without a restart."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import httpx
import pytest
import yaml

from tests.support import start_gateway_process, stop_process, wait_for

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "helm" / "llm-worker"
TAG = uuid.uuid4().hex[:6]


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class SecretVolume:
    """A directory laid out as the kubelet's atomic writer lays out a Secret volume:
    ``<item> -> ..data/<item>``, ``..data -> ..<timestamp dir>``; an update writes a new
    timestamp directory and renames a new ``..data`` link over the old one."""

    def __init__(self, root: Path, item: str) -> None:
        self.root = root
        self.item = item
        self.generation = 0
        root.mkdir(parents=True)

    def write(self, content: str) -> None:
        self.generation += 1
        new_dir = self.root / f"..2026_12_06_00_00_00.{self.generation}"
        new_dir.mkdir()
        (new_dir / self.item).write_text(content)
        old_target = os.readlink(self.root / "..data") if self.generation > 1 else None
        tmp_link = self.root / "..data_tmp"
        tmp_link.symlink_to(new_dir.name)
        tmp_link.rename(self.root / "..data")
        if old_target is None:
            (self.root / self.item).symlink_to(f"..data/{self.item}")
        else:
            for leftover in (self.root / old_target).iterdir():
                leftover.unlink()
            (self.root / old_target).rmdir()


def rendered_gateway(mount_path: Path) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    """The chart's ConfigMap data, gateway container and pod spec with the keys file from an
    existing Secret mounted at ``mount_path``."""
    values = {
        "gateway": {
            "enabled": True,
            "keysFile": {"existingSecret": "gw-keys-file", "mountPath": str(mount_path)},
        }
    }
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values, name="rel", namespace="ns")
    objects = [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    (deployment,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return configmap["data"], container, pod


def test_a_secret_volume_update_rotates_keys_without_a_restart(
    redis_url: str, tmp_path: Path
) -> None:
    """The gateway as the chart configures it (its ConfigMap, its keys-file variable, the
    Secret volume's item) accepts the key of the mounted file; after a kubelet-style update of
    the volume the new key is accepted and the old one refused, by the same process."""
    mount = tmp_path / "keys-volume"
    config, container, pod = rendered_gateway(mount)
    env = {e["name"]: e for e in container["env"]}
    keys_file = Path(env["LLM_WORKER_GATEWAY_API_KEYS_FILE"]["value"])
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    (item,) = volume["secret"]["items"]
    assert keys_file == mount / item["path"]

    old, new = (f"volume-{TAG}-{n}-key" for n in ("old", "new"))
    secret = SecretVolume(mount, item["path"])
    secret.write(f"vol-{TAG}:{_sha(old)}\n")
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_WORKER_")}
    process_env.update(config)
    process_env["LLM_WORKER_REDIS_URL"] = redis_url
    process_env["LLM_WORKER_GATEWAY_API_KEYS_FILE"] = str(keys_file)
    process_env["LLM_WORKER_LOG_LEVEL"] = "WARNING"
    proc, url = start_gateway_process(process_env)

    def status(key: str) -> int:
        response = httpx.get(f"{url}/v1/messages/batches", headers={"x-api-key": key}, timeout=10)
        return response.status_code

    try:
        assert status(old) == 200
        assert status(new) == 401
        link = os.lstat(keys_file)
        secret.write(f"vol-{TAG}:{_sha(new)}\n")
        # As on a node: the file's own path is the same link; only what it leads to changed.
        assert (os.lstat(keys_file).st_ino, os.lstat(keys_file).st_mtime_ns) == (
            link.st_ino,
            link.st_mtime_ns,
        )
        assert _sha(new) in keys_file.read_text()
        wait_for(lambda: status(new) == 200, 10, "the key of the updated Secret volume")
        assert status(old) == 401
        assert proc.poll() is None
    finally:
        stop_process(proc)
