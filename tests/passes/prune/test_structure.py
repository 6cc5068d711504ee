from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prunegraphs import bert, llama

import kiln
from kiln import testing
from kiln.compiler import cli
from kiln.compiler.inspect import inspect_structure
from kiln.passes.prune.structure import StructureError, find_structure


def test_pre_norm_llama_blocks(tmp_path: Path) -> None:
    model = llama(tmp_path, layers=3, hidden=32, heads=4, intermediate=48)
    structure = find_structure(model)
    assert structure.norm == "pre" and len(structure.blocks) == 3
    for i, block in enumerate(structure.blocks):
        attention, mlp = block.attention.attention, block.mlp.mlp
        assert (attention.num_heads, attention.num_kv_heads, attention.head_dim) == (4, 4, 8)
        assert [p.weight.name for p in (attention.q, attention.k, attention.v, attention.o)] == [
            f"layers.{i}.{n}_proj" for n in "qkvo"
        ]
        assert (mlp.gate.weight.name, mlp.up.weight.name, mlp.down.weight.name) == tuple(
            f"layers.{i}.{n}_proj" for n in ("gate", "up", "down")
        )
        assert block.attention.add.name == f"layers.{i}.attention_residual"
        assert block.mlp.output.name == f"layers.{i}.mlp_residual"
        assert block.mlp.residual is block.attention.output
    assert structure.blocks[0].input.name == "embed"
    assert structure.blocks[1].input is structure.blocks[0].output


def test_post_norm_bert_blocks() -> None:
    structure = find_structure(bert(layers=2))
    assert structure.norm == "post" and len(structure.blocks) == 2
    block = structure.blocks[1]
    assert block.input.name == "l0.ln2"
    assert block.attention.norm.name == "l1.ln1" and block.attention.output.name == "l1.ln1"
    assert block.attention.attention.o.bias.name == "l1.o.b"
    mlp = block.mlp.mlp
    assert mlp.gate is None and (mlp.up.weight.name, mlp.down.weight.name) == ("l1.fc1.w", "l1.fc2.w")
    assert block.output.name == "l1.ln2"


def test_describe_is_json() -> None:
    info = find_structure(bert(layers=2, heads=8)).describe()
    json.dumps(info)
    assert (info["blocks"], info["heads"], info["head_dim"], info["mlp"], info["mlp_width"]) == (2, 8, 4, "plain", 64)


def test_not_a_transformer() -> None:
    with pytest.raises(StructureError, match="no transformer structure: the main graph has no Softmax"):
        find_structure(testing.mlp([8, 16, 4]))


def test_inspect_structure_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = kiln.save(testing.mlp([8, 16, 4]), tmp_path / "mlp.onnx")
    with pytest.raises(StructureError, match=re.escape(f"{path}: no transformer structure")):
        inspect_structure(path)
    assert cli.main(["inspect", "--structure", str(path)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"kiln: error: {path}: no transformer structure")
    good = kiln.save(bert(layers=2), tmp_path / "bert.onnx")
    assert cli.main(["inspect", "--structure", "--json", str(good)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["blocks"] == 2 and info["layers"][1]["mlp"]["down"]["weight"] == "l1.fc2.w"
    assert cli.main(["inspect", "--structure", str(good)]) == 0
    assert "2 transformer blocks, post-norm, hidden 32, heads 4 x 8" in " ".join(capsys.readouterr().out.split())


@pytest.mark.zoo
def test_zoo_structures(minilm_path: Path, smollm2_path: Path, smollm2_decode_path: Path) -> None:
    minilm = inspect_structure(minilm_path)
    assert (minilm["blocks"], minilm["norm"], minilm["heads"], minilm["head_dim"], minilm["mlp_width"]) == (
        6,
        "post",
        12,
        32,
        1536,
    )
    for path, cache in ((smollm2_path, False), (smollm2_decode_path, True)):
        info = inspect_structure(path)
        assert (info["blocks"], info["norm"], info["heads"], info["kv_heads"], info["mlp"]) == (
            30,
            "pre",
            9,
            3,
            "gated",
        )
        assert info["kv_cache"] is cache
        if cache:
            assert info["layers"][7]["attention"]["past"] == ["past_key_values.7.key", "past_key_values.7.value"]
            assert info["layers"][7]["attention"]["present"] == ["present.7.key", "present.7.value"]
