"""The local backend needs no network: start it and analyse a frame inside a fresh network
namespace (`unshare --net`: no interface but a downed loopback), where any download a
model package attempted at run time would fail, and check that faces, labels and text
all came back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.netns import in_ci

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, socket
    import cv2, numpy as np
    from skimage import data

    from server.analysis.local_backend import LocalAnalyser
    from server.analysis.observation import Checks
    from server.config import Settings
    from server.media.frames import Frame

    async def main():
        frame = np.full((480, 640, 3), 95, np.uint8)
        head = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)[20:320, 110:370]
        frame[20:280, 207:432] = cv2.resize(head, (225, 260))
        cv2.putText(frame, "Offline exam notes", (40, 400), cv2.FONT_HERSHEY_SIMPLEX, 1.3,
                    (250, 250, 250), 3, cv2.LINE_AA)
        ok, buf = cv2.imencode(".jpg", frame)
        analyser = LocalAnalyser(Settings(_env_file=None, analyser_backend="local"))
        await analyser.start()
        obs = await analyser.analyse(Frame.from_encoded(buf.tobytes(), "image/jpeg"),
                                     Checks(faces=True, labels=True, text=True))
        await analyser.close()
        interfaces = [name for _, name in socket.if_nameindex()]
        print(json.dumps({"interfaces": interfaces, "obs": obs.to_json()}))

    asyncio.run(main())
    """
)


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        proc = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def test_local_backend_runs_with_networking_disabled(tmp_path: Path) -> None:
    if not unshare_works():
        reason = "`unshare --net` is not permitted here"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        # A fresh home: no model cache of any kind to fall back on.
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCRIPT],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["interfaces"] == ["lo"]  # really in a namespace without a network
    obs = out["obs"]
    assert obs["backend"] == "local" and obs["degraded"] == []
    assert len(obs["faces"]) == 1 and obs["faces"][0]["pose"] is not None
    assert max(obs["faces"][0]["emotions"], key=obs["faces"][0]["emotions"].get) == "HAPPY"
    assert "Person" in {label["name"] for label in obs["labels"]}
    assert [line["text"] for line in obs["text"]] == ["Offline exam notes"]
    assert not list(tmp_path.rglob("*.onnx")), "a model was fetched into the fresh home"
