"""pyproject.toml and environment.yml describe one environment."""

import tomllib
from importlib.metadata import version

import yaml

from course_utils.paths import REPO_ROOT


def pyproject_pins() -> set[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        return set(tomllib.load(fh)["project"]["dependencies"])


def conda_pip_pins() -> set[str]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip section"
    return {p for p in pip_sections[0] if not p.startswith("-e")}


def test_environment_yml_matches_pyproject():
    ours, conda = pyproject_pins(), conda_pip_pins()
    assert ours == conda, f"only in pyproject: {sorted(ours - conda)}; only in environment.yml: {sorted(conda - ours)}"


def test_every_dependency_is_pinned():
    assert all("==" in pin for pin in pyproject_pins())


def test_installed_versions_match_pins():
    for pin in pyproject_pins():
        name, wanted = pin.split("==")
        assert version(name).split("+")[0] == wanted, f"{name} {version(name)} installed, {wanted} pinned: run `make install`"


def test_the_changelog_names_the_package_version():
    """A tagged release is a CHANGELOG entry and the package version together (docs/instructors.md)."""
    import re

    package = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    newest = re.search(r"^## (\S+)", (REPO_ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert newest == package, f"CHANGELOG's newest entry is {newest}, pyproject says {package}"
