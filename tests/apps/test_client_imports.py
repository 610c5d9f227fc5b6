"""What a fresh ClientApp process loads: Flower starts one per message in a deployment, so a
library imported by ``client.app`` is paid by every message of every site, needed or not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Libraries only some paths need: HE mode (core.he, TenSEAL), DICOM or NIfTI sites (their
# readers), segmentation and reports (MONAI, matplotlib, scikit-learn through MONAI).
LAZY = ("tenseal", "core.he", "pydicom", "nibabel", "monai", "matplotlib", "sklearn")


def test_importing_the_clientapp_loads_none_of_the_optional_libraries():
    code = (
        "import json, sys\nimport client.app\n"
        f"print(json.dumps([m for m in {LAZY!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
