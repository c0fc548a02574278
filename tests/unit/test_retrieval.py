import numpy as np

from tunewise.data.records import Example
from tunewise.evaluate.arms import build_prompts
from tunewise.evaluate.retrieval import retrieve_shots, train_index


def chat(i: int, question: str, answer: str) -> Example:
    return Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], f"d.jsonl:{i}")


TRAIN = [
    chat(1, "How do I bake sourdough bread at home?", "bread"),
    chat(2, "What is the capital city of France?", "geo"),
    chat(3, "How can I fix a flat bicycle tyre?", "bike"),
    chat(4, "Which river flows through Paris?", "geo"),
    chat(5, "What temperature should I bake bread at?", "bread"),
]


def test_retrieves_the_most_similar_training_examples_most_similar_last(tmp_path):
    test = [chat(9, "How long should sourdough bread bake?", "?"), chat(10, "What is France's capital?", "?")]
    shots = retrieve_shots(TRAIN, test, 2, tmp_path / "index")
    assert {e.source for e in shots[0]} == {"d.jsonl:1", "d.jsonl:5"}
    assert shots[1][-1].source == "d.jsonl:2"  # the nearest sits next to the question
    prompts = build_prompts("retrieved_few_shot", test, "Answer.", shots)
    assert prompts[1][0] == {"role": "system", "content": "Answer."}
    assert prompts[1][-1]["content"] == "What is France's capital?"
    assert [m["content"] for m in prompts[1][1:-1:2]] == [e.messages[0]["content"] for e in shots[1]]


def test_train_index_is_cached_in_the_run_folder_and_rebuilt_when_train_changes(tmp_path):
    first = train_index(TRAIN, tmp_path)
    assert first.shape == (5, 384) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    stamp = (tmp_path / "train_embeddings.npy").stat().st_mtime_ns
    np.testing.assert_array_equal(train_index(TRAIN, tmp_path), first)
    assert (tmp_path / "train_embeddings.npy").stat().st_mtime_ns == stamp
    assert train_index(TRAIN[:3], tmp_path).shape == (3, 384)
