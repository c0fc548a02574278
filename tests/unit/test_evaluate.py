import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

from tunewise.artifacts import Decision
from tunewise.data.outputs import detect_output_type, parse_json
from tunewise.evaluate.metrics import (
    infer_schema,
    macro_f1,
    score_items,
    score_json,
    score_label,
    score_text,
)
from tunewise.evaluate.stats import (
    bootstrap_ci,
    bootstrap_statistic,
    mcnemar_exact,
    paired_bootstrap,
)
from tunewise.evaluate.verdict import (
    decide_verdict,
    forgetting_flag,
    length_drift_flag,
    overfitting_flag,
    refusal_flag,
)

SHIP, NO_SHIP = Decision.SHIP, Decision.DO_NOT_SHIP


def test_json_scores():
    ref = '{"section": "net", "architecture": "any"}'
    assert score_json(ref, ref) == {"json_exact": 1.0, "json_valid": 1.0, "field_accuracy": 1.0,
                                    "field:section": 1.0, "field:architecture": 1.0}
    half = score_json('```json\n{"section": "net", "architecture": "all"}\n```', ref)
    assert half["json_valid"] == 1.0 and half["json_exact"] == 0.0 and half["field_accuracy"] == 0.5
    broken = score_json('{"section": "net", ', ref)
    assert broken == {"json_exact": 0.0, "json_valid": 0.0, "field_accuracy": 0.0,
                      "field:section": 0.0, "field:architecture": 0.0}
    assert parse_json("[1, 2]") == [1, 2] and parse_json("nope") is None


def test_label_and_text_scores():
    assert score_label(" Positive. ", "positive") == {"accuracy": 1.0}
    assert score_label("negative", "positive") == {"accuracy": 0.0}
    # token F1 by hand: pred {the, cat, sat}, ref {the, cat, ran, away}: P=2/3, R=2/4
    f1 = score_text("The cat sat", "the cat ran away")["token_f1"]
    assert f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_output_type_detection():
    assert detect_output_type(['{"a": 1}', '{"a": 2}']) == "json"
    assert detect_output_type(["positive", "negative"] * 30) == "label"
    assert detect_output_type([f"a long free answer number {i} with many words" for i in range(50)]) == "text"


def test_mcnemar_matches_statsmodels():
    rng = np.random.default_rng(0)
    a = (rng.random(120) < 0.7).astype(float)
    b = (rng.random(120) < 0.5).astype(float)
    only_a, only_b, p = mcnemar_exact(list(a), list(b))
    table = [[int(((a == 1) & (b == 1)).sum()), only_a], [only_b, int(((a == 0) & (b == 0)).sum())]]
    assert p == pytest.approx(sm_mcnemar(table, exact=True).pvalue)


def test_bootstrap_intervals():
    scores = [1.0] * 70 + [0.0] * 30
    ci = bootstrap_ci(scores, samples=2000, alpha=0.05, seed=0)
    assert ci.mean == 0.7 and ci.low < 0.7 < ci.high
    # normal-approximation half width is 1.96*sqrt(.7*.3/100) = 0.09
    assert 0.07 < (ci.high - ci.low) / 2 < 0.11
    diff, p = paired_bootstrap(scores, scores, samples=500, alpha=0.05, seed=0)
    assert (diff.mean, diff.low, diff.high, p) == (0.0, 0.0, 0.0, 1.0)


def _scores(values):
    return [{"json_exact": float(v)} for v in values]


def test_verdict_ships_only_a_significant_gain_over_the_margin():
    base = _scores([1] * 40 + [0] * 60)
    better = _scores([1] * 40 + [1] * 40 + [0] * 20)
    kw = dict(primary="json_exact", margin=0.02, alpha=0.05, samples=500, seed=0, red_flags=[])
    shipped = decide_verdict({"zero_shot": _scores([0] * 100), "few_shot": base, "finetuned": better}, **kw)
    assert shipped.decision == SHIP and shipped.best_baseline == "few_shot"
    assert shipped.test["name"] == "McNemar exact" and shipped.test["p_value"] < 0.001
    same = decide_verdict({"few_shot": base, "finetuned": base}, **kw)
    assert same.decision == NO_SHIP and "does not beat few-shot prompting" in same.reason
    slight = decide_verdict({"few_shot": base, "finetuned": _scores([1] * 41 + [0] * 59)}, **kw)
    assert slight.decision == NO_SHIP and "not significant" in slight.reason
    big_margin = decide_verdict({"few_shot": base, "finetuned": better}, **{**kw, "margin": 0.5})
    assert big_margin.decision == NO_SHIP and "below the required margin" in big_margin.reason
    # every arm gets its own paired comparison; the best one decides
    assert set(shipped.comparisons) == {"zero_shot", "few_shot"}
    assert shipped.comparisons["zero_shot"]["difference"]["mean"] == pytest.approx(0.8)


def test_blocking_red_flag_turns_ship_into_no_ship_and_others_only_show():
    base = _scores([1] * 40 + [0] * 60)
    better = _scores([1] * 80 + [0] * 20)
    kw = dict(primary="json_exact", margin=0.02, alpha=0.05, samples=500, seed=0)
    flag = {"name": "forgetting", "message": "forgetting: ...", "blocking": True}
    blocked = decide_verdict({"few_shot": base, "finetuned": better}, red_flags=[flag], **kw)
    assert blocked.decision == NO_SHIP and "blocked by red flags: forgetting" in blocked.reason
    shown = decide_verdict({"few_shot": base, "finetuned": better}, red_flags=[{**flag, "blocking": False}], **kw)
    assert shown.decision == SHIP and shown.red_flags[0]["blocking"] is False


def test_reference_arms_are_compared_but_not_counted_as_baselines():
    strong = _scores([1] * 95 + [0] * 5)
    better = _scores([1] * 80 + [0] * 20)
    kw = dict(primary="json_exact", margin=0.02, alpha=0.05, samples=500, seed=0, red_flags=[])
    scores = {"few_shot": _scores([1] * 40 + [0] * 60), "gpt": strong, "finetuned": better}
    counted = decide_verdict(scores, **kw)
    assert counted.best_baseline == "gpt" and counted.decision == NO_SHIP
    reference = decide_verdict(scores, baselines=["few_shot"], **kw)
    assert reference.best_baseline == "few_shot" and reference.decision == SHIP
    assert reference.comparisons["gpt"]["difference"]["mean"] == pytest.approx(-0.15)


def test_length_refusal_and_forgetting_flags():
    refs = ["abcd"] * 10
    assert length_drift_flag(["abcd"] * 10, refs, ["a" * 40] * 10, 2.0) is None
    long = length_drift_flag(["a" * 12] * 10, refs, ["a" * 40] * 10, 2.0)
    assert "3.00x the references" in long and "base model's zero-shot outputs are 10.00x" in long
    assert "0.25x" in length_drift_flag(["a"] * 10, refs, [], 2.0)
    assert refusal_flag([0.0] * 20, [0.0] * 20, 0.05) is None
    more = refusal_flag([1.0] * 5 + [0.0] * 15, [0.0] * 20, 0.05)
    assert "25.0%" in more and "base model 0.0%" in more
    assert forgetting_flag([1.0] * 30 + [0.0] * 30, [1.0] * 28 + [0.0] * 32, 0.1) is None
    dropped = forgetting_flag([1.0] * 30 + [0.0] * 30, [1.0] * 18 + [0.0] * 42, 0.1)
    assert "from 0.500 (base) to 0.300" in dropped and "12 items lost" in dropped


def test_overfitting_flag():
    rising = [{"step": s, "train_loss": 2.0 - 0.1 * s} for s in range(1, 13)]
    rising += [{"step": 3, "val_loss": 1.0}, {"step": 6, "val_loss": 0.8}, {"step": 12, "val_loss": 1.2}]
    assert "overfitting" in overfitting_flag(rising)
    falling = [r if "val_loss" not in r else {**r, "val_loss": 1.0 / r["step"]} for r in rising]
    assert overfitting_flag(falling) is None


def test_schema_inferred_from_training_outputs_and_checked_with_jsonschema():
    targets = ['{"section": "net", "architecture": "any"}', '{"section": "doc", "architecture": "all"}']
    schema = infer_schema(targets)
    assert schema["required"] == ["section", "architecture"] and schema["additionalProperties"] is False
    assert schema["properties"]["section"] == {"type": "string", "enum": ["doc", "net"]}
    ref = targets[0]
    ok = score_json('{"section": "doc", "architecture": "all"}', ref, schema)
    assert ok["json_schema_valid"] == 1.0 and ok["json_exact"] == 0.0
    for bad in ['{"section": "games", "architecture": "all"}', '{"section": "net"}',
                '{"section": "net", "architecture": "any", "extra": 1}', "not json"]:
        assert score_json(bad, ref, schema)["json_schema_valid"] == 0.0, bad


def test_text_metrics_come_from_the_reference_libraries():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    pred, ref = "the cat sat on the mat", "the cat lay on the mat"
    scores = score_items("text", [pred], [ref])[0]
    assert scores["rouge_l"] == pytest.approx(rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure)
    assert scores["chrf"] == pytest.approx(CHRF().sentence_score(pred, [ref]).score / 100)
    same = score_items("text", [ref], [ref])[0]
    assert same["rouge_l"] == 1.0 and same["chrf"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0)


def test_length_ratio_and_refusal_for_every_type():
    rows = score_items("label", ["I'm sorry, but I can't help with that.", "yes"], ["no", "no"])
    assert rows[0]["refusal"] == 1.0 and rows[1]["refusal"] == 0.0
    assert rows[1]["length_ratio"] == pytest.approx(1.5)
    assert score_items("json", ['{"a": 1}'], ['{"a": 1}'])[0]["refusal"] == 0.0


def test_macro_f1_by_hand_and_its_bootstrap():
    refs = ["a", "a", "b", "b"]
    preds = ["a", "b", "b", "b"]
    # a: P=1, R=.5, F1=2/3; b: P=2/3, R=1, F1=.8; macro = (2/3 + .8) / 2
    assert macro_f1(preds, refs) == pytest.approx((2 / 3 + 0.8) / 2)
    scores = [1.0] * 30 + [0.0] * 20
    mean_ci = bootstrap_ci(scores, samples=300, alpha=0.05, seed=0)
    stat_ci = bootstrap_statistic(lambda idx: float(np.mean([scores[i] for i in idx])), 50, samples=300,
                                  alpha=0.05, seed=0)
    assert stat_ci.mean == mean_ci.mean == 0.6
    assert stat_ci.low == pytest.approx(mean_ci.low, abs=0.03) and stat_ci.high == pytest.approx(mean_ci.high, abs=0.03)


def test_confusion_matrices_match_scikit_learn():
    from sklearn.metrics import confusion_matrix

    from tunewise.evaluate.runner import confusions

    refs = ['{"section": "net", "arch": "all"}', '{"section": "games", "arch": "any"}', '{"section": "net", "arch": "any"}']
    outs = ['{"section": "net", "arch": "all"}', '{"section": "net"}', "not json"]
    matrices = confusions("json", outs, refs)
    section = matrices["section"]
    assert section["labels"] == ["games", "net"] and section["columns"] == ["games", "net", "(other)"]
    expected = confusion_matrix(["net", "games", "net"], ["net", "net", "(other)"], labels=["games", "net", "(other)"])
    assert section["matrix"] == expected[:2].tolist()
    assert set(matrices) == {"section", "arch"}
    labels = confusions("label", ["Yes", "no.", "maybe"], ["yes", "no", "no"])["label"]
    assert labels["matrix"] == [[1, 0, 1], [0, 1, 0]] and labels["columns"] == ["no", "yes", "(other)"]
    assert confusions("text", ["a"], ["b"]) == {}
