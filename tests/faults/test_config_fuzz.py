"""The config fuzz of the fault harness (benchmarks/config_fuzz.py), a CPU-quick share of it, and the refusals
it found missing: misspelt head arguments and crop scales outside (0, 1] before any process starts."""
import pytest

from benchmarks.config_fuzz import KINDS, Mutation, draw_mutations, fuzz, judge, run_in_process, seed_recipes


def test_every_seed_passes_the_check_unmutated_and_mutations_are_refused_with_one_line_naming_the_key():
    outcomes, bad_seeds = fuzz(48, seed=7)
    assert bad_seeds == []  # otherwise a refusal would prove nothing
    assert {o.mutation.kind for o in outcomes} == set(KINDS)
    failed = [(o.mutation.seed, o.mutation.word[:120], o.why, o.error) for o in outcomes if not o.passed]
    assert not failed


def test_mutations_cover_every_seed_recipe_and_are_reproducible():
    first, again = draw_mutations(60, seed=3), draw_mutations(60, seed=3)
    assert [m.word for m in first] == [m.word for m in again]
    assert {m.seed for m in first} == set(seed_recipes())


def test_the_judge_fails_an_accepted_mutation_and_a_traceback():
    mutation = Mutation("pretrain/swav/swav_1node_cpu_resnet18", "range", "config.OPTIMIZER.num_epochs=3",
                        "num_epochs")
    status, err = run_in_process(mutation.argv())
    assert status == 0 and not judge(mutation, status, err).passed  # a valid value is not refused
    assert judge(mutation, 1, "Traceback (most recent call last):\nKeyError: 'x'").why == "traceback"


@pytest.mark.parametrize("word, names", [
    ("config.MODEL.HEAD.PARAMS=[[swav_head, {dims: [512, 512, 64], num_clusters: [30], usebn: true}]]", "usebn"),
    ("config.MODEL.HEAD.PARAMS=[[swav_head, {dism: [512, 512, 64], num_clusters: [30]}]]", "dism"),
    ("config.MODEL.HEAD.PARAMS=[[mlps, {dims: [512, 64]}]]", "mlps"),
    ("config.DATA.TRAIN.TRANSFORMS=[{name: ImgPilToMultiCrop, num_crops: [2], size_crops: [32], "
     "crop_scales: [[0, 1]]}, {name: ToTensor}]", "crop_scales"),
    ("config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32, scale: [0.2, 1.5]}, {name: ToTensor}]",
     "scale"),
])
def test_head_arguments_and_crop_scales_are_checked_before_training(word, names):
    mutation = Mutation("pretrain/swav/swav_1node_cpu_resnet18", "head", word, names)
    outcome = judge(mutation, *run_in_process(mutation.argv()))
    assert outcome.passed, (outcome.why, outcome.error)


def test_cfg_job_of_a_64_rank_seed_on_the_built_in_dataset_prints_the_config_and_says_why_no_derived_values():
    status, err = run_in_process(["config=pretrain/swav/swav_8node_resnet"])
    assert status == 0, err
