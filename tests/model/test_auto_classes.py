"""`import pathchat` registers the Auto classes; a PathChat folder loads by path with plain transformers.

Each check runs in a fresh interpreter: in this process pathchat.model.modeling is long imported, which
registers the classes by itself and would hide a broken `import pathchat`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_models import build_tiny

from pathchat.model.auto import AUTO_HOOKS


def _run(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_import_pathchat_is_light_and_hooks_transformers_auto_modules():
    code = ("import sys, json, pathchat; "
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'pathchat.model.modeling')}))")
    assert _result(_run(code)) == {"torch": False, "transformers": False, "pathchat.model.modeling": False}
    assert set(AUTO_HOOKS) == {"transformers.models.auto.configuration_auto",
                               "transformers.models.auto.modeling_auto"}


@pytest.mark.slow
def test_a_pathchat_folder_loads_with_the_auto_classes_after_import_pathchat(tmp_path):
    model, tokenizer = build_tiny("qwen2")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    expected = float(sum(p.double().sum() for p in model.state_dict().values()))
    folder = str(tmp_path / "ckpt")
    report = ("print(json.dumps({'class': type(m).__name__, 'config': type(c).__name__, 'before': before, "
              "'sum': float(sum(p.double().sum() for p in m.state_dict().values()))}))")
    readme_order = (  # the README's two lines
        "import json\nimport pathchat\nfrom transformers import AutoConfig, AutoModelForCausalLM\nbefore = None\n"
        f"c = AutoConfig.from_pretrained({folder!r})\nm = AutoModelForCausalLM.from_pretrained({folder!r})\n{report}")
    transformers_first = (  # unknown until `import pathchat`, which registers at once
        "import json\nfrom transformers import AutoConfig, AutoModelForImageTextToText\n"
        f"try:\n    AutoConfig.from_pretrained({folder!r}); before = 'loaded'\n"
        "except ValueError:\n    before = 'unknown'\n"
        f"import pathchat\nc = AutoConfig.from_pretrained({folder!r})\n"
        f"m = AutoModelForImageTextToText.from_pretrained({folder!r})\n{report}")
    procs = [_run(readme_order), _run(transformers_first)]
    results = [_result(proc) for proc in procs]
    assert [r["before"] for r in results] == [None, "unknown"]
    for result in results:
        assert result["class"] == "PathChatForConditionalGeneration" and result["config"] == "PathChatConfig"
        assert result["sum"] == pytest.approx(expected, rel=1e-12)  # the saved weights, all of them
