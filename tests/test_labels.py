import numpy as np
import pytest
import torch

from ensembler.errors import DataError, ParameterError
from ensembler.labels import (
    Factor,
    LabelSpace,
    age_band,
    factored_to_joint_logprobs,
    joint_from_factor_logprobs,
    validate_age_bands,
)


def test_mask_space_matches_competition_formula():
    ls = LabelSpace.mask()
    assert ls.num_classes == 18 and ls.factor_sizes == (3, 2, 3)
    for m in range(3):
        for g in range(2):
            for a in range(3):
                assert ls.joint_index((m, g, a)) == m * 6 + g * 3 + a
                assert tuple(int(i) for i in ls.factor_indices(m * 6 + g * 3 + a)) == (m, g, a)
    assert ls.classes[0] == "wear-male-young" and ls.classes[17] == "not_wear-female-old"


def test_age_bands():
    assert [age_band(a) for a in (29, 30, 59, 60)] == [0, 1, 1, 2]
    assert [age_band(a, (29, 58)) for a in (28, 29, 57, 58)] == [0, 1, 1, 2]
    with pytest.raises(DataError, match="--age-bands"):
        validate_age_bands((60, 30))


def test_roundtrip_dict_and_factor_space():
    ls = LabelSpace.mask((29, 58))
    again = LabelSpace.from_dict(ls.to_dict())
    assert again == ls and again.meta["age_bands"] == [29, 58]
    age = ls.factor_space("age")
    assert age.classes == ("young", "middle", "old") and age.meta["factor"] == "age"
    with pytest.raises(ParameterError, match="no factor named 'hair'; factors are"):
        ls.factor("hair")
    with pytest.raises(ParameterError, match="a factor is named twice"):
        ls.factors_space(["age", "age"])


def test_index_accepts_names_and_ints_and_names_unknown():
    ls = LabelSpace(("cat", "dog"))
    assert ls.index("dog") == 1 and ls.index(0) == 0 and ls.index("1") == 1
    with pytest.raises(DataError, match="unknown class 'cow'"):
        ls.index("cow")
    with pytest.raises(DataError, match="out of range"):
        ls.index(2)


def test_bad_spaces_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        LabelSpace(("a", "a"))
    with pytest.raises(ValueError, match="give 4 classes"):
        LabelSpace(("a", "b", "c"), (Factor("x", ("1", "2")), Factor("y", ("1", "2"))))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_factored_joint_is_product_of_factor_probs(backend):
    rng = np.random.default_rng(0)
    out = rng.normal(size=(5, 8))
    x = torch.tensor(out) if backend == "torch" else out
    joint = factored_to_joint_logprobs(x, (3, 2, 3))
    joint = np.asarray(joint)
    p = np.exp(joint)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)

    def sm(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    pm, pg, pa = sm(out[:, :3]), sm(out[:, 3:5]), sm(out[:, 5:])
    expected = np.einsum("nm,ng,na->nmga", pm, pg, pa).reshape(5, 18)
    np.testing.assert_allclose(p, expected, rtol=1e-9)


def test_joint_from_factor_logprobs_order():
    a = np.log(np.array([[0.2, 0.8]]))
    b = np.log(np.array([[0.1, 0.3, 0.6]]))
    j = np.exp(joint_from_factor_logprobs([a, b]))
    np.testing.assert_allclose(j, [[0.02, 0.06, 0.12, 0.08, 0.24, 0.48]])
