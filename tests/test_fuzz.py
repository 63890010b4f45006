"""Fixed-budget, deterministic fuzzing (hypothesis, derandomized, no example database): the prompt
parser and tokenizer, the infotext parser, and the safetensors, LoRA and hypernetwork loaders
return a result or raise a documented `edgesd.errors` exception, never anything else.
`python tests/fuzz_long.py` runs the same targets far longer (and with atheris when installed).
"""

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fuzz_targets as targets  # noqa: E402
from conftest import TINY_CONFIG, requires_exporter  # noqa: E402

BUDGET = int(os.environ.get("EDGESD_FUZZ_EXAMPLES", "150"))
LONG_RUN = "EDGESD_FUZZ_EXAMPLES" in os.environ  # fuzz_long.py: random (seeded by --hypothesis-seed)


def fuzz(examples=BUDGET):
    return settings(max_examples=examples, derandomize=not LONG_RUN, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))


prompts = st.one_of(st.text(alphabet=targets.PROMPT_ALPHABET, max_size=80),
                    st.lists(st.sampled_from(targets.PROMPT_WORDS), max_size=40).map("".join), st.text(max_size=40))
infotexts = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Size", "RNG", "Clip skip",
                                        "Schedule type", "Denoising strength", "Hires upscale", "ENSD", "Emphasis",
                                        "Variation seed", "Variation seed strength", "Hires steps"]),
                       st.text(alphabet="abcxyz ", min_size=1, max_size=8)).flatmap(
        lambda key: st.tuples(st.just(key), st.one_of(st.integers(-5, 2**70).map(str), st.sampled_from(
            ["nan", "inf", "-1", "1e999", "Euler a", "DPM++ 2M Karras", "64x64", "0x0", "12x", '"a, b"', "NV", "x"])))),
        max_size=12).flatmap(lambda pairs: st.text(max_size=30).map(
            lambda prompt: prompt + "\nNegative prompt: n\n" + ", ".join(f"{k}: {v}" for k, v in pairs))))


@pytest.fixture(scope="module")
def tokenizer(tiny_export):
    from edgesd.runtime.tokenizer import ClipTokenizer

    return ClipTokenizer(tiny_export / "tokenizer")


def test_fuzz_prompt_parser_and_tokenizer(tokenizer):
    @fuzz(BUDGET * 2)
    @given(prompts)
    def run(text):
        targets.check_prompt(text, tokenizer)

    run()


@fuzz(BUDGET * 2)
@given(infotexts)
def test_fuzz_infotext_parser(text):
    targets.check_infotext(text)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_safetensors():
    dtypes = {"F32": 4, "F16": 2, "I64": 8, "U8": 1}
    header, offset = {}, 0
    for i, (dtype, size) in enumerate(dtypes.items()):
        header[f"t{i}"] = {"dtype": dtype, "shape": [2, 3], "data_offsets": [offset, offset + 6 * size]}
        offset += 6 * size
    return targets.safetensors_bytes({"__metadata__": {"a": "b"}, **header}, bytes(range(256))[:offset])


@requires_exporter
def test_fuzz_safetensors_loader(scratch, valid_safetensors):
    mutations = st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(valid_safetensors) - 1), st.integers(0, 255)).map(
            lambda m: valid_safetensors[:m[0]] + bytes([m[1]]) + valid_safetensors[m[0] + 1:]),
        st.integers(0, len(valid_safetensors)).map(lambda n: valid_safetensors[:n]),
        st.dictionaries(st.text(max_size=5), st.fixed_dictionaries({
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "Q4", "", "F64"]),
            "shape": st.lists(st.integers(-2, 5), max_size=3),
            "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3)}), max_size=3).flatmap(
            lambda h: st.binary(max_size=64).map(lambda data: targets.safetensors_bytes(h, data))))

    @fuzz()
    @given(mutations)
    def run(data):
        targets.check_safetensors(data, scratch / "f.safetensors")

    run()


@pytest.fixture(scope="module")
def base(tiny_checkpoint):
    from edgesd.exporter.load import load_model

    return load_model(tiny_checkpoint, TINY_CONFIG)


LORA_MODULES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "lora_unet_conv_in",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_mid_block_attentions_0_proj_in",
                "unet.down_blocks.0.attentions.0.proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1", "x"]
LORA_PARAMS = ["lora_down.weight", "lora_up.weight", "alpha", "lora_mid.weight", "hada_w1_a", "hada_w1_b",
               "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lora_A.weight", "lora_B.weight", "dora_scale"]


@requires_exporter
def test_fuzz_lora_loader(base, scratch):
    import torch

    tensors = st.lists(st.one_of(st.just(0), st.integers(1, 40)), min_size=0, max_size=4).flatmap(
        lambda shape: st.sampled_from([0.0, 1.0, float("nan"), 1e30]).map(lambda v: torch.full(shape, v)))
    files = st.dictionaries(st.tuples(st.sampled_from(LORA_MODULES), st.sampled_from(LORA_PARAMS)).map(".".join),
                            tensors, min_size=1, max_size=5)

    @fuzz(BUDGET // 4)
    @given(files)
    def run(state):
        targets.check_lora(state, scratch / "l.safetensors", base)

    run()


@requires_exporter
def test_fuzz_hypernetwork_loader(base, scratch):
    import torch

    from edgesd.exporter.adapters import synth

    good = torch.load(str(synth.write_hypernetwork(base, scratch / "good.pt")), weights_only=True)
    values = st.one_of(st.none(), st.booleans(), st.just(torch.zeros(2)), st.integers(-3, 3), st.text(max_size=6),
                       st.lists(st.floats(allow_nan=True), max_size=4), st.just(torch.zeros(2, 2)),
                       st.just(({}, {})), st.just(({"linear.0.weight": torch.zeros(3, 3)}, {})))
    keys = st.one_of(st.sampled_from(list(good) + ["activation_func", "layer_structure", "is_layer_norm",
                                                   "dropout_structure", "use_dropout", 768, 32, 0, -1]),
                     st.text(max_size=5))
    objects = st.one_of(st.dictionaries(keys, values, max_size=5).map(lambda d: {**good, **d}),
                        st.dictionaries(keys, values, max_size=5), values)

    @fuzz(BUDGET // 6)
    @given(objects)
    def run(obj):
        targets.check_hypernetwork(obj, scratch / "h.pt", base)

    run()
