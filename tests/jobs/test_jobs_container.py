"""containers/esa.def: the sections a working image needs, the shared install step, the pins."""

from __future__ import annotations

import re
from pathlib import Path

import esa

REPO = Path(__file__).resolve().parents[2]
DEF = REPO / "containers" / "esa.def"


def sections(text: str) -> dict[str, str]:
    """{'post': body, ...} for each %section of an Apptainer definition file."""
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif current:
            out[current] += line + "\n"
    return out


def header(text: str) -> dict[str, str]:
    """The 'Key: value' header lines before the first section."""
    head = text.split("\n%", 1)[0]
    return {m.group(1).lower(): m.group(2).strip()
            for m in re.finditer(r"^(\w+):\s*(\S.*)$", head, re.MULTILINE)}


def pinned(name: str) -> str:
    m = re.search(rf"^{re.escape(name)}==([^\s#]+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert m, f"{name} is not pinned with == in requirements.txt"
    return m.group(1)


def test_def_has_the_sections_an_image_needs():
    text = DEF.read_text()
    secs = sections(text)
    for name in ("labels", "files", "post", "environment", "runscript", "test"):
        assert name in secs, f"%{name} missing from {DEF}"
    head = header(text)
    assert head["bootstrap"] == "docker"
    env = secs["environment"]
    for var, value in (("HF_HUB_OFFLINE", "1"), ("HDF5_USE_FILE_LOCKING", "FALSE"), ("PYTHONNOUSERSITE", "1")):
        assert re.search(rf"export {var}={value}\b", env), f"%environment must export {var}={value}"
    assert re.search(r"export HF_HOME=", env)
    assert 'exec python -m esa "$@"' in secs["runscript"]
    # a tiny smoke run: tiny model + baseline on the built-in data with short windows
    assert "esa tiny-model" in secs["test"] and "esa baseline" in secs["test"]
    assert "--dataset builtin" in secs["test"] and "--seq-len 32" in secs["test"]


def test_def_installs_through_the_shared_install_step():
    secs = sections(DEF.read_text())
    assert re.search(r"containers/install\.sh python3\b", secs["post"]), \
        "%post must run containers/install.sh (the install step make setup and CI use)"
    assert "pip install" not in secs["post"], "dependencies are installed by install.sh only"
    copied = {line.split()[0] for line in secs["files"].splitlines() if line.strip() and not line.strip().startswith("#")}
    for needed in ("requirements.txt", "pyproject.toml", "containers/install.sh", "esa", "README.md"):
        assert needed in copied, f"%files does not copy {needed}"
    # every copied path exists in the repo (paths are relative to the repo root, where make image runs)
    for path in copied:
        assert (REPO / path).exists(), f"%files copies {path}, which does not exist"
    # the Makefile's setup target uses the same script
    assert "containers/install.sh" in (REPO / "Makefile").read_text()


def test_base_image_torch_matches_the_pin():
    frm = header(DEF.read_text())["from"]
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", frm)
    assert m, f"From: {frm} is not a pinned pytorch/pytorch:<torch>-cuda<X>-cudnn<Y>-runtime tag"
    assert m.group(1) == pinned("torch"), (
        f"base image has torch {m.group(1)} but requirements.txt pins torch=={pinned('torch')}: "
        "change both together")


def test_labels_carry_the_package_version():
    labels = sections(DEF.read_text())["labels"]
    m = re.search(r"^\s*version\s+(\S+)", labels, re.MULTILINE)
    assert m and m.group(1) == esa.__version__, "%labels version must equal esa.__version__"
    t = re.search(r"^\s*torch\s+(\S+)", labels, re.MULTILINE)
    assert t and t.group(1) == pinned("torch")
