"""Where synthtune writes and reads when it is not imported from its own checkout (a wheel install)."""

from __future__ import annotations

from synthtune import paths


def _checkout(root):
    (root / "configs").mkdir(parents=True)
    (root / "synthtune").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'synthtune'\n")
    return root


def test_an_editable_checkout_is_its_own_root():
    assert paths._is_checkout(paths._PACKAGE_PARENT) and paths._root() == paths._PACKAGE_PARENT


def test_installed_elsewhere_the_root_is_the_checkout_around_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("SYNTHTUNE_ROOT", raising=False)
    monkeypatch.setattr(paths, "_PACKAGE_PARENT", tmp_path / "site-packages")  # not a checkout
    repo = _checkout(tmp_path / "repo")
    (repo / "notebooks").mkdir()
    monkeypatch.chdir(repo / "notebooks")
    assert paths._root() == repo
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no checkout around: outputs go under the working directory, never site-packages
    assert paths._root() == elsewhere
    monkeypatch.setenv("SYNTHTUNE_ROOT", str(repo))
    assert paths._root() == repo
