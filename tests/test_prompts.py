"""A1111 prompt syntax and long-prompt encoding.

- `parse_prompt_attention` equals a hand-derived table and an independent regex-based
  reference of A1111's algorithm (exact float equality: weights are multiplied in A1111's order).
- Chunking (75 tokens, BREAK, comma backtracking, padding) equals a reference of A1111's
  `tokenize_line`, token for token and weight for weight.
- Weighted embeddings equal torch's CLIPTextModel + A1111's emphasis within 1e-5.
- A plain prompt of <= 75 tokens is encoded exactly as before chunking existed.
- A ~200-token prompt gives diffusers' image (fed the same chunk-concatenated embeddings,
  so the UNet runs on a 77*3 context) within 2e-3 on [0, 1] pixels.
"""

import importlib.util
import random
import re

import numpy as np
import pytest

from conftest import record_graph, requires_exporter
from edgesd.errors import InvalidArgumentError, UnknownNameError
from edgesd.runtime.prompts import apply_emphasis, encode_prompts, parse_prompt_attention, tokenize_prompt

R, S = 1.1, 1 / 1.1  # A1111's multipliers; expected weights are written as A1111's products, in its order

PARSE_TABLE = [
    ("", [("", 1.0)]),
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", R * S), (" a ", R), ("hill", 0.5 * R),
      (", sun, ", R), ("sky", R * R * R * R), (".", R)]),
    ("[a]", [("a", S)]),
    ("((a))", [("a", 1.0 * R * R)]),
    ("[[a]]", [("a", 1.0 * S * S)]),
    ("(a:1.5)", [("a", 1.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+2)", [("a", 2.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),  # no open bracket: the weight is text
    ("(a:1.5", [("a:1.5", R)]),  # no closing bracket: not a weight, the bracket stays open
    ("(a:b)", [("a:b", R)]),
    ("a)", [("a)", 1.0)]),
    ("a]", [("a]", 1.0)]),
    ("[a)", [("a)", S)]),
    ("(a]", [("a]", R)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -1 * R), ("b", R)]),  # a bracketed BREAK is no BREAK
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1), ("", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a:BREAK b", [("a:", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("\\(a)", [("(a)", 1.0)]),
    ("(a\\)", [("a)", R)]),
    ("((a:1.3) b)", [("a", 1.3 * R), (" b", R)]),
    ("(a:1.2:3)", [("a:1.2", 3.0)]),
    ("[a:1.5]", [("a:1.5", S)]),
    ("(a)[b]", [("a", R), ("b", S)]),
    ("(a)(b:1.1)", [("ab", R)]),  # equal weights merge
    ("[(a)]", [("a", 1.0 * R * S)]),
    ("((a) b", [("a", R * R), (" b", R)]),
    ("[a (b] c)", [("a ", S), ("b", S * R), (" c", R)]),
    ("a: b", [("a: b", 1.0)]),
    ("(a:1e2)", [("a:1e2", R)]),
    ("(猫:1.2), dog", [("猫", 1.2), (", dog", 1.0)]),
    ("((a)", [("a", R * R)]),
    ("(a:1.1) (b)", [("a", 1.1), (" ", 1.0), ("b", R)]),
    ("[a] [b]", [("a", S), (" ", 1.0), ("b", S)]),
]


# -- an independent regex-based reference of A1111's parse_prompt_attention --------------

REF_TOKEN = re.compile(r"\\[()\[\]\\]|\\|[(\[]|:([+-]?[.\d]+)\)|[)\]]|[^\\()\[\]:]+|:")
REF_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def reference_parse(text):
    out, rounds, squares = [], [], []

    def times(start, k):
        for item in out[start:]:
            item[1] *= k

    for m in REF_TOKEN.finditer(text):
        tok, w = m.group(0), m.group(1)
        if tok[0] == "\\":
            out.append([tok[1:], 1.0])
        elif tok in "([":
            (rounds if tok == "(" else squares).append(len(out))
        elif w is not None and rounds:
            times(rounds.pop(), float(w))
        elif tok == ")" and rounds:
            times(rounds.pop(), 1.1)
        elif tok == "]" and squares:
            times(squares.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(REF_BREAK.split(tok)):
                if i:
                    out.append(["BREAK", -1])
                out.append([piece, 1.0])
    for start in rounds:
        times(start, 1.1)
    for start in squares:
        times(start, 1 / 1.1)
    out = out or [["", 1.0]]
    merged = [out[0]]
    for item in out[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [tuple(x) for x in merged]


@pytest.mark.parametrize("text,expected", PARSE_TABLE)
def test_parse_matches_table_and_reference(text, expected):
    got = parse_prompt_attention(text)
    assert got == expected  # exact: same products in the same order
    assert reference_parse(text) == expected


def test_parse_random_prompts_match_reference():
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "(", ")", "[", "]", ":", "1.5", ".", "\\", ",", " BREAK ", "BREAK", "-", "+", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            expected = reference_parse(text)
        except ValueError:  # A1111 fails on weights like "(a:1.5.)"; edgesd says so
            with pytest.raises(InvalidArgumentError, match="attention weight"):
                parse_prompt_attention(text)
            continue
        assert parse_prompt_attention(text) == expected, text


def test_unparsable_weight_is_a_user_error():
    with pytest.raises(InvalidArgumentError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")
    assert parse_prompt_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]  # no open bracket: plain text


# -- chunking -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("the CLIP vocabulary comes from open-clip-torch (the export extra)")
    from edgesd.exporter.tokenizer_files import write_clip_tokenizer
    from edgesd.runtime.tokenizer import ClipTokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_clip_tokenizer(folder)
    return ClipTokenizer(folder)


def reference_chunks(tok, line, backtrack=20):
    """A1111's FrozenCLIPEmbedderWithCustomWords.tokenize_line (no textual inversion), restated."""
    parsed = reference_parse(line)
    comma = tok.token_id(",</w>")
    chunks, cur_t, cur_w, state = [], [], [], {"comma": -1}

    def flush():
        nonlocal cur_t, cur_w
        fill = 75 - len(cur_t)
        chunks.append(([tok.bos_id] + cur_t + [tok.eos_id] * fill + [tok.eos_id],
                       [1.0] + cur_w + [1.0] * fill + [1.0]))
        cur_t, cur_w, state["comma"] = [], [], -1

    for (text, weight), ids in zip(parsed, tok.encode_batch([t for t, _ in parsed])):
        if text == "BREAK" and weight == -1:
            flush()
            continue
        for t in ids:
            if t == comma:
                state["comma"] = len(cur_t)
            elif backtrack and len(cur_t) == 75 and state["comma"] != -1 and 75 - state["comma"] <= backtrack:
                cut = state["comma"] + 1
                keep_t, keep_w = cur_t[cut:], cur_w[cut:]
                cur_t, cur_w = cur_t[:cut], cur_w[:cut]
                flush()
                cur_t, cur_w = keep_t, keep_w
            if len(cur_t) == 75:
                flush()
            cur_t.append(t)
            cur_w.append(weight)
    if cur_t or not chunks:
        flush()
    return chunks


def long_prompts():
    words = "red blue green tiny huge old new shiny dark bright".split()
    rng = random.Random(1)
    out = []
    for n, comma_every in ((80, 0), (74, 9), (150, 7), (200, 13), (75, 0), (76, 5), (160, 30)):
        parts = []
        for i in range(n):
            w = rng.choice(words)
            if rng.random() < 0.2:
                w = f"({w}:{rng.choice(['1.2', '0.8', '1.5'])})"
            parts.append(w + ("," if comma_every and i % comma_every == comma_every - 1 else ""))
        out.append(" ".join(parts))
    out.append("a, " * 40 + "BREAK " + "(b c) " * 50)
    out.append("BREAK a")
    out.append("x " * 75 + ", y")
    return out


@pytest.mark.parametrize("backtrack", [20, 0])
def test_chunks_match_a1111_tokenize_line(tokenizer, backtrack):
    for prompt in [t for t, _ in PARSE_TABLE if "1.2.3" not in t] + long_prompts():
        got = tokenize_prompt(prompt, tokenizer, backtrack=backtrack)
        want = reference_chunks(tokenizer, prompt, backtrack)
        assert [(c.tokens, c.weights) for c in got] == want, prompt
        assert all(len(c.tokens) == 77 == len(c.weights) for c in got)


def test_chunk_rules(tokenizer):
    assert len(tokenize_prompt("", tokenizer)) == 1
    assert len(tokenize_prompt("a BREAK b", tokenizer)) == 2
    assert len(tokenize_prompt("a BREAK b", tokenizer, emphasis="None")) == 1  # no parsing at all
    assert len(tokenize_prompt("cat " * 75, tokenizer)) == 1 and len(tokenize_prompt("cat " * 76, tokenizer)) == 2
    # backtracking: the text after the last comma moves to the second chunk
    first, second = tokenize_prompt("cat " * 70 + ", " + "dog " * 10, tokenizer)
    comma = tokenizer.token_id(",</w>")
    assert first.tokens[71] == comma and set(first.tokens[72:]) == {tokenizer.eos_id}
    assert second.tokens[1:11] == tokenizer.encode("dog " * 10)
    weights = tokenize_prompt("(cat:1.5) [dog]", tokenizer)[0].weights
    assert weights[:4] == [1.0, 1.5, 1 / 1.1, 1.0]
    with pytest.raises(UnknownNameError):
        tokenize_prompt("a", tokenizer, emphasis="Strong")


def test_emphasis_arithmetic():
    z = np.random.default_rng(0).standard_normal((2, 77, 8)).astype(np.float32) + 0.5
    w = np.ones((2, 77), np.float32)
    w[0, 3] = 1.5
    no_norm = apply_emphasis(z, w, "No norm")
    assert np.allclose(no_norm[0, 3], z[0, 3] * 1.5) and np.array_equal(no_norm[1], z[1])
    original = apply_emphasis(z, w, "Original")
    assert np.allclose(original.mean(axis=(1, 2)), z.mean(axis=(1, 2)), rtol=1e-5)  # mean restored per chunk
    assert np.array_equal(original[1], z[1])
    assert apply_emphasis(z, w, "Ignore") is z


# -- against torch and diffusers ---------------------------------------------------------

PLAIN = "a red circle on a black background"
WEIGHTED = "a (red:1.4) circle on a [[black]] background, ((sharp)) BREAK (unfinished"
LONG = ", ".join(["a (red:1.2) circle", "a [blue] square", "green triangles", "on a black background"] * 12)


@pytest.fixture(scope="module")
def pipe(tiny_export):
    from edgesd import Pipeline

    return Pipeline.from_pretrained(tiny_export, provider="cpu")


LN_SHIFT = 0.25


@pytest.fixture(scope="module")
def shifted(tiny_export, reference_pipeline, tmp_path_factory):
    """(Pipeline, torch text encoder) with the final LayerNorm's bias shifted by a constant.

    The synthetic model's final LayerNorm has zero bias, so a chunk's mean is ~1e-9 of rounding
    noise and "Original"'s mean ratio is ill-conditioned (real CLIP's is far from zero). The
    same shift in the exported graph and in the torch reference makes the comparison meaningful.
    """
    import copy
    import shutil
    from types import SimpleNamespace

    import torch

    from edgesd import Pipeline
    from edgesd.exporter.onnx_export import export_component
    from edgesd.models import get_family, load_configs
    from edgesd.models.families import EXPORTED_CONFIG_FILES

    encoder = copy.deepcopy(reference_pipeline.text_encoder)
    with torch.no_grad():
        getattr(encoder, "text_model", encoder).final_layer_norm.bias += LN_SHIFT
    folder = tmp_path_factory.mktemp("shifted") / "model"
    shutil.copytree(tiny_export, folder)
    configs = load_configs(folder, EXPORTED_CONFIG_FILES)
    spec = get_family("sd1").components(configs)[0]
    export_component(spec, SimpleNamespace(text_encoder=encoder), configs, folder)
    record_graph(folder, "text_encoder")
    return Pipeline.from_pretrained(folder, provider="cpu"), encoder


def torch_reference(encoder, tok, prompts, emphasis="Original"):
    """CLIPTextModel run on A1111's chunks, A1111's emphasis applied in torch."""
    import torch

    rows = [tokenize_prompt(p, tok) for p in prompts]
    count = max(len(r) for r in rows)
    empty = tokenize_prompt("", tok)[0]
    out = []
    for chunks in rows:
        zs = []
        for c in chunks + [empty] * (count - len(chunks)):
            with torch.no_grad():
                z = encoder(torch.tensor([c.tokens]))[0]
            mean = z.mean()
            z = z * torch.tensor(c.weights).reshape(1, -1, 1)
            zs.append(z * (mean / z.mean()) if emphasis == "Original" else z)
        out.append(torch.cat(zs, dim=1))
    return torch.cat(out).numpy()


@requires_exporter
@pytest.mark.parametrize("emphasis", ["Original", "No norm"])
def test_weighted_embeddings_match_torch(shifted, emphasis):
    pipe, encoder = shifted
    prompts = [PLAIN, WEIGHTED, LONG, ""]
    got = pipe.encode_prompts(prompts, emphasis=emphasis)
    want = torch_reference(encoder, pipe.tokenizer, prompts, emphasis)
    assert got.shape == want.shape == (4, 77 * 3, 32)  # LONG has 3 chunks; the others are padded to 3
    assert np.abs(got - want).max() < 1e-5
    plain = pipe.encode_prompts(["a red circle on a black background, sharp"], emphasis=emphasis)
    assert np.abs(got[1, :77] - plain[0]).max() > 1e-2  # the weights do change the embedding


@requires_exporter
def test_plain_prompt_encoding_is_unchanged(pipe):
    """<= 75 tokens, no emphasis: bit-identical to one 77-token chunk of last_hidden_state."""
    prompts = [PLAIN, "blurry"]
    ids = np.array([pipe.tokenizer.pad(t) for t in pipe.tokenizer.encode_batch(prompts)], dtype=np.int64)
    before = pipe.text_encoder.run(["last_hidden_state"], input_ids=ids)[0]
    np.testing.assert_array_equal(pipe.encode_prompts(prompts), before)


@requires_exporter
def test_repeated_prompts_and_emphasis_modes(pipe):
    a = pipe.encode_prompts([WEIGHTED, PLAIN, WEIGHTED])
    np.testing.assert_array_equal(a[0], a[2])
    ignore = pipe.encode_prompts([WEIGHTED], emphasis="Ignore")
    no_norm = pipe.encode_prompts([WEIGHTED], emphasis="No norm")
    assert not np.allclose(ignore, a[:1]) and not np.allclose(no_norm, a[:1])


@requires_exporter
def test_long_prompt_image_matches_diffusers_with_prompt_embeds(shifted, reference_pipeline):
    import torch
    from diffusers import EulerDiscreteScheduler

    from test_parity import SD1_SCHEDULER, fixed_latents

    pipe, encoder = shifted
    prompt = LONG
    assert len(pipe.tokenizer.encode(prompt)) > 200
    negative = "blurry"
    latents = fixed_latents()
    embeds = torch_reference(encoder, pipe.tokenizer, [prompt, negative])
    assert embeds.shape[1] == 77 * 3  # the UNet gets a 231-token context
    reference_pipeline.scheduler = EulerDiscreteScheduler.from_config(SD1_SCHEDULER, use_karras_sigmas=True,
                                                                      timestep_spacing="linspace")
    with torch.no_grad():
        want = reference_pipeline(prompt_embeds=torch.from_numpy(embeds[:1]),
                                  negative_prompt_embeds=torch.from_numpy(embeds[1:]), num_inference_steps=8,
                                  guidance_scale=7.0, height=64, width=64, latents=torch.from_numpy(latents),
                                  output_type="np").images
    got = pipe(prompt, negative_prompt=negative, num_inference_steps=8, guidance_scale=7.0, latents=latents,
               sampler="Euler", schedule="Karras", output_type="np")
    assert np.abs(got.images - want).max() < 2e-3
    short = pipe(prompt[:60], negative_prompt=negative, num_inference_steps=8, latents=latents, sampler="Euler",
                 schedule="Karras", output_type="np").images
    assert np.abs(short - want).max() > 2e-2  # the chunks past the first matter
    assert "Emphasis" not in got.infotext


def test_encode_prompts_function_pads_rows_to_one_chunk_count(tokenizer):
    calls = []

    def fake_encoder(ids):
        calls.append(ids.shape)
        return np.repeat(ids[:, :, None].astype(np.float32), 4, axis=2)

    z = encode_prompts(["a BREAK b BREAK c", "x", "x"], tokenizer, fake_encoder)
    assert z.shape == (3, 231, 4) and calls == [(6, 77)]  # 2 unique prompts x 3 chunks, one call
    assert z[1, 77, 0] == tokenizer.bos_id and z[1, 78, 0] == tokenizer.eos_id  # padded with the empty chunk


@requires_exporter
def test_emphasis_goes_into_the_infotext_when_not_the_default(pipe):
    def info(prompt, emphasis):
        return pipe(prompt, emphasis=emphasis, num_inference_steps=1, seed=1, output_type="latent").infotext

    assert "Emphasis: No norm" in info("a (red) circle", "No norm")
    assert "Emphasis" not in info("a red circle", "No norm")  # A1111: only when a prompt has brackets
    assert "Emphasis" not in info("a (red) circle", "Original")
    with pytest.raises(UnknownNameError, match="emphasis"):
        info("a", "Strong")
