"""The documentation cannot drift from the code: every numeric config key has a row in
docs/calibration.md, and the README's commands exist."""

import re
from pathlib import Path

from tlbsim import Config
from tlbsim.sweep import flatten

REPO = Path(__file__).resolve().parent.parent


def test_every_numeric_default_is_in_calibration_md():
    text = (REPO / "docs" / "calibration.md").read_text()
    missing = []
    for key, value in flatten(Config().to_dict()).items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key.startswith("run."):
            continue
        leaf = key.rsplit(".", 1)[-1]
        section = key.split(".")[0]
        # a row names the key itself, or (exits, vf) its parent with the leaf in a combined row
        if key not in text and not re.search(rf"{re.escape(key.rsplit('.', 1)[0])}\.?[^\n|]*{leaf}", text) \
                and not (section == "vf" and f"vf.{leaf}" in text):
            missing.append(key)
    assert not missing, f"no calibration row for {missing}"


def test_readme_make_targets_exist():
    readme = (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"^make (\w[\w-]*)", readme, flags=re.M)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
