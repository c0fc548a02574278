"""The generation cache: hits skip generation, any change of model, prompt or settings misses."""

from tunewise.evaluate.cache import GenerationCache, cached_generate, model_fingerprint


def test_only_misses_are_generated_and_keys_cover_model_prompt_settings(tmp_path):
    cache = GenerationCache(tmp_path / "g.sqlite")
    calls = []

    def fake(prompts):
        def generate(indices, keep):
            calls.append(list(indices))
            return [prompts[i].upper() for i in indices]
        return generate

    prompts = ["a", "b", "c"]
    out, hits = cached_generate(cache, "m1", {"max_new_tokens": 8}, prompts, fake(prompts))
    assert out == ["A", "B", "C"] and hits == 0 and calls == [[0, 1, 2]]
    more = ["c", "d", "a"]
    out, hits = cached_generate(cache, "m1", {"max_new_tokens": 8}, more, fake(more))
    assert out == ["C", "D", "A"] and hits == 2 and calls[-1] == [1]
    _, hits = cached_generate(cache, "m2", {"max_new_tokens": 8}, prompts, fake(prompts))
    assert hits == 0  # another model
    _, hits = cached_generate(cache, "m1", {"max_new_tokens": 16}, prompts, fake(prompts))
    assert hits == 0  # other settings
    # a new process sees the same file
    _, hits = cached_generate(GenerationCache(tmp_path / "g.sqlite"), "m1", {"max_new_tokens": 8}, prompts,
                              fake(prompts))
    assert hits == 3


def test_outputs_are_kept_as_they_arrive_so_a_crash_at_item_n_keeps_the_ones_before(tmp_path):
    cache = GenerationCache(tmp_path / "g.sqlite")
    prompts = [f"p{i}" for i in range(5)]

    def crashes_at_the_fourth(indices, keep):
        for j, i in enumerate(indices):
            if i == 3:
                raise RuntimeError("the endpoint went away")
            keep({j: prompts[i].upper()})
        return [prompts[i].upper() for i in indices]

    try:
        cached_generate(cache, "m", {}, prompts, crashes_at_the_fourth)
    except RuntimeError:
        pass
    out, hits = cached_generate(cache, "m", {}, prompts, lambda idx, keep: [prompts[i].upper() for i in idx])
    assert hits == 3 and out == ["P0", "P1", "P2", "P3", "P4"]  # the rerun generated only items 3 and 4


def test_cache_off_always_generates(tmp_path):
    cache = GenerationCache(None)
    for _ in range(2):
        _, hits = cached_generate(cache, "m", {}, ["x"], lambda idx, keep: ["y" for _ in idx])
        assert hits == 0


def test_fingerprint_follows_weight_content(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_fingerprint(tmp_path)
    assert model_fingerprint(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x01" + b"\x00" * 63)
    assert model_fingerprint(tmp_path) != first
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x02")
    assert model_fingerprint(tmp_path, adapter) != model_fingerprint(tmp_path)
