"""The generated configuration reference (docs/configuration.md) is current and complete, and the
config package stands on its own (no import of fct.ssl, fct.transformations or torch)."""

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from fct.config import reference
from fct.config.reference import DOC_PATH, ENTRY_POINTS, field_comments, render, sections


def test_configuration_reference_is_current():
    assert DOC_PATH.is_file(), "docs/configuration.md is missing: run `make docs`"
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date with fct/config: run `make docs`"
    )


def test_check_fails_on_a_stale_file_with_one_line(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    out.write_text(render().replace("| `epochs` |", "| `epoch` |", 1), encoding="utf-8")
    assert reference.main(["--check", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of date" in err and "make docs" in err
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(out)]) == 0
    assert reference.main(["--check", "--output", str(tmp_path / "missing.md")]) == 1


def test_every_config_key_is_described():
    missing = []
    for _, cls in ENTRY_POINTS:
        for section in sections(cls):
            comments = field_comments(section.cls)
            missing += [f"{section.cls.__name__}.{f.name}" for f in dataclasses.fields(section.cls)
                        if f.init and not comments.get(f.name)]
    assert not missing, f"config fields without a '# comment' (the reference's description): {missing}"


def test_entry_scripts_load_the_documented_class(repo):
    modules = {"fct.experiments": "fct/experiments/steps.py"}  # a package: its step kinds load the configs
    for script, cls in ENTRY_POINTS:
        if script.startswith("python -m "):
            module = script.split()[2]
            source = modules.get(module, module.replace(".", "/") + ".py")
        else:
            source = script
        assert f"load_config({cls.__name__}," in (repo / source).read_text(), (script, cls.__name__)


@dataclass(frozen=True)
class _Commented:
    """A section for the comment reader."""

    plain: int  # trailing comment
    # a comment block
    # of two lines
    above: Optional[str] = None
    # above and
    both: bool = True  # at the end
    bare: float = 0.5


def test_field_comments_read_above_and_trailing():
    assert field_comments(_Commented) == {
        "plain": "trailing comment", "above": "a comment block of two lines", "both": "above and at the end",
        "bare": "",
    }


@pytest.mark.parametrize("value, text", [(None, "null"), (True, "true"), ("", '""'), ("true", '"true"'),
                                         ("l2", "l2"), ([0.2, 1.0], "[0.2, 1.0]"), (["random"], "[random]")])
def test_defaults_as_yaml(value, text):
    assert reference.default_text(value) == text


def test_config_package_imports_no_torch_ssl_or_transformations():
    code = ("import sys, fct.config, fct.config.reference; "
            "bad = [m for m in sys.modules "
            "       if m == 'torch' or m.startswith(('fct.ssl', 'fct.transformations'))]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
