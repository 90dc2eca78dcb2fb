"""The quality ensemble's recipe: every member, the candidates, the ranker and the fuser, with the
settings that determine their checkpoints (``default_recipe``: the measured one)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from service.quality import fuser, lm, ranker, suite
from service.quality.members import AdapterRecipe, BaseRecipe, FineTuneRecipe, LibraryAdapterRecipe, Training

S = lm.Source
LITERAL = "Be literal."  # the system turn under which base A follows reverse instructions


@dataclass(frozen=True)
class CandidateRecipe:
    """Training prompts the members answer (greedy) for the ranker and the fuser: ``per_skill`` of
    each of ``suite.ALL_SKILLS``, at most ``max_new_tokens`` (the demo's members' ``max_tokens``)."""

    per_skill: int
    seed: int
    max_new_tokens: int = 12


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the checkpoints. Members are trained in ``members`` order."""

    members: dict[str, BaseRecipe | AdapterRecipe]
    candidates: CandidateRecipe
    ranker: ranker.RankerRecipe
    fuser: fuser.FuserRecipe
    eval_seed: int = suite.DEFAULT_EVAL_SEED
    eval_per_skill: int = 100
    # Trained after the members, for the other ways to combine models (more soft prompts for a prompt
    # ensemble, full fine-tunes to merge); their answers do not train the ranker or the fuser.
    variants: dict[str, AdapterRecipe | FineTuneRecipe | LibraryAdapterRecipe] = field(default_factory=dict)

    def scaled(self, scale: float) -> Recipe:
        """The same recipe with ``scale`` times the steps and training prompts (the CI's small mode)."""

        def member(r: BaseRecipe | AdapterRecipe) -> BaseRecipe | AdapterRecipe:
            return replace(r, training=r.training.scaled(scale))

        def steps(n: int) -> int:
            return max(4, round(n * scale))

        def variant(
            r: AdapterRecipe | FineTuneRecipe | LibraryAdapterRecipe,
        ) -> AdapterRecipe | FineTuneRecipe | LibraryAdapterRecipe:
            return replace(r, training=r.training.scaled(scale))

        return replace(
            self,
            members={name: member(r) for name, r in self.members.items()},
            variants={name: variant(r) for name, r in self.variants.items()},
            candidates=replace(self.candidates, per_skill=steps(self.candidates.per_skill)),
            ranker=replace(self.ranker, steps=steps(self.ranker.steps), warmup=steps(self.ranker.warmup)),
            fuser=replace(self.fuser, steps=steps(self.fuser.steps), warmup=steps(self.fuser.warmup)),
        )


def default_recipe() -> Recipe:
    """The measured recipe: five narrow members, a PairRM and a GenFuser."""
    return Recipe(
        members={
            # Knows half the capitals; confuses sort and reverse unless a system turn asks it to be literal.
            "base-a": BaseRecipe(
                tokenizer="char",
                hidden=128,
                layers=2,
                intermediate=256,
                training=Training(
                    mix=(
                        S("capital", 0.5, countries=len(suite.COUNTRIES) // 2),
                        S("sort", 1.0, answer_as="reverse"),
                        S("reverse", 1.0, answer_as="sort"),
                        S("reverse", 1.5, system=LITERAL),
                    ),
                    steps=700,
                    lr=2e-3,
                    seed=1,
                ),
            ),
            # Adds; asked a capital and a sum at once (suite.COMPOUND), repeats the country and adds right.
            "base-b": BaseRecipe(
                tokenizer="bpe",
                bpe_vocab=400,
                hidden=128,
                layers=2,
                intermediate=512,
                training=Training(mix=(S("add"), S(suite.COMPOUND, answer_as="sum-half")), steps=1200, lr=1e-3, seed=2),
            ),
            "lora-sort": AdapterRecipe("base-a", "lora", Training(mix=(S("sort"),), steps=200, lr=3e-3, seed=3)),
            # Knows every capital; asked a capital and a sum at once, writes the city right and the two
            # numbers side by side: with base-b, each answers one half of a compound prompt and only
            # fusion answers both (issue 25).
            "lora-capital": AdapterRecipe(
                "base-a",
                "lora",
                Training(mix=(S("capital"), S(suite.COMPOUND, answer_as="capital-half")), steps=300, lr=3e-3, seed=4),
            ),
            # Finds a stand-in for the system turn that makes base A reverse words.
            "soft-reverse": AdapterRecipe(
                "base-a", "prompt", Training(mix=(S("reverse"),), steps=200, lr=1e-1, seed=5), virtual_tokens=16
            ),
        },
        variants={
            # Two more soft prompts for the reverse skill, other seeds (and one shorter): with soft-reverse,
            # Lester et al.'s prompt ensemble of three, combined by majority vote.
            "soft-reverse-2": AdapterRecipe(
                "base-a", "prompt", Training(mix=(S("reverse"),), steps=200, lr=1e-1, seed=21), virtual_tokens=16
            ),
            "soft-reverse-3": AdapterRecipe(
                "base-a", "prompt", Training(mix=(S("reverse"),), steps=200, lr=1e-1, seed=22), virtual_tokens=8
            ),
            # Three soft prompts trained for a fifth of soft-reverse's steps (seeds 31-33): each right on about
            # 70% of reversals, so that their vote has mistakes to correct (the three above are at the ceiling).
            **{
                f"soft-reverse-brief-{k}": AdapterRecipe(
                    "base-a",
                    "prompt",
                    Training(mix=(S("reverse"),), steps=40, lr=1e-1, seed=30 + k, warmup=20),
                    virtual_tokens=16,
                )
                for k in (1, 2, 3)
            },
            # Two full fine-tunes of base A on different skills: the parents of the merged models.
            "ft-sort": FineTuneRecipe("base-a", Training(mix=(S("sort"),), steps=150, lr=5e-4, seed=23)),
            "ft-capital": FineTuneRecipe("base-a", Training(mix=(S("capital"),), steps=150, lr=5e-4, seed=24)),
            # The adapters library's bottleneck adapter and prefix tuning on lora-sort's skill, served by the
            # adapter server (trained in .venv-adapters; 400 steps, about 20 s each here).
            "bn-sort": LibraryAdapterRecipe(
                "base-a", "bottleneck", Training(mix=(S("sort"),), steps=400, lr=3e-3, seed=41)
            ),
            "prefix-sort": LibraryAdapterRecipe(
                "base-a", "prefix", Training(mix=(S("sort"),), steps=400, lr=5e-3, seed=42)
            ),
        },
        candidates=CandidateRecipe(per_skill=1500, seed=500, max_new_tokens=16),
        ranker=ranker.RankerRecipe(hidden=128, layers=2, intermediate=256, steps=1000, lr=5e-4, seed=7, hard_weight=4),
        # Single letters, the previous-token prior and half of each batch synthetic: see python -m bench.fusion
        # (docs/QUALITY.md, "Fusion: what was tried") for each change's share of the gain.
        fuser=fuser.FuserRecipe(
            d_model=128,
            layers=2,
            d_ff=256,
            steps=600,
            lr=2e-3,
            seed=11,
            pieces="letters",
            previous_token_bias=8.0,
            induction_prior=3.0,
            synthetic=0.5,
        ),
    )
