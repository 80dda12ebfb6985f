"""Packaging checks that need no Docker: the Dockerfile only runs installs CI runs too."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_commands(dockerfile: str) -> list[str]:
    text = dockerfile.replace("\\\n", " ")
    return [" ".join(m.split()) for m in re.findall(r"^RUN\s+(.+)$", text, flags=re.M)]


def test_dockerfile_installs_are_in_ci():
    ci = " ".join((ROOT / ".ci" / "run").read_text().split())
    installs = [c for c in _run_commands((ROOT / "Dockerfile").read_text()) if "pip install" in c]
    assert installs, "the Dockerfile should install the package"
    for command in installs:
        assert command in ci, f"Dockerfile runs `{command}` but .ci/run does not"


def _torch_pin(text: str, where: str) -> str:
    pins = re.findall(r"pip install[^\n]*\btorch==([\w.+]+)", text)
    assert len(pins) == 1, f"{where}: expected one `pip install torch==X`, found {pins}"
    return pins[0]


def test_docker_and_ci_install_one_torch_inside_the_declared_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    docker = _torch_pin((ROOT / "Dockerfile").read_text(), "Dockerfile")
    ci = _torch_pin((ROOT / ".ci" / "run").read_text(), ".ci/run")
    assert docker == ci, f"the image installs torch {docker}, CI tests {ci}"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert Version(ci) in torch_req.specifier, f"CI's torch {ci} is outside pyproject's {torch_req}"


def test_dockerfile_runs_as_non_root_with_train_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER\s+(?!root)\w+", text, flags=re.M)
    assert 'ENTRYPOINT ["python", "train.py"]' in text


def test_dockerignore_keeps_data_and_runs_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in ("data/", "logs/", "*.ckpt"):
        assert entry in ignored


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^\s*(python -m pytest[^\n`]*)$", readme, flags=re.M)
    assert match, "README must give the test command"
    assert match.group(1).strip() in (ROOT / ".ci" / "run").read_text()


def test_console_scripts_point_at_functions():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = meta["project"]["scripts"]
    import importlib

    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
