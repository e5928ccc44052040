"""The kinds of episode, each declared by its keys (never by the rank of a tensor), with its layout stated once.

Every kind is a plain dict of tensors with a leading task axis, so any `tf.data` pipeline can produce it:

  supervised  `support_x` [tasks, examples, *input], `support_y` [tasks, examples, *target],
              `query_x`, `query_y` likewise: one support set per task (N-way K-shot, sine regression).
  stream      `stream_x` [tasks, steps, batch, *input], `stream_y` [tasks, steps, batch, *target] in place of the
              support set: inner step k trains on batch k (cycling), e.g. multi-shot Omniglot and continual
              streams; `query_x`, `query_y` as in a supervised episode (continual streams: [tasks, sub_tasks,
              points, ...]).
  family      a supervised episode's keys with a family axis of L tasks after the task axis ([families, L,
              examples, ...]) and the `goal_` keys of its G goal tasks: learning to meta-learn (MALTML).
  rollout     `task` [tasks, ...]: the parameters of a task whose support data the learner produces itself (a
              policy's rollouts), e.g. a bandit's arm rewards; the learner's objectives read them.

`kind_of` names the kind of a dict; each learner validates the kinds it takes (`EpisodicLearner.check_episodes`).
"""

from __future__ import annotations

SUPERVISED_KEYS = ("support_x", "support_y", "query_x", "query_y")
STREAM_KEYS = ("stream_x", "stream_y", "query_x", "query_y")
GOAL_KEYS = tuple(f"goal_{k}" for k in SUPERVISED_KEYS)
FAMILY_KEYS = SUPERVISED_KEYS + GOAL_KEYS
ROLLOUT_KEYS = ("task",)
KINDS = {"family": FAMILY_KEYS, "stream": STREAM_KEYS, "supervised": SUPERVISED_KEYS, "rollout": ROLLOUT_KEYS}


def kind_of(episodes) -> str:
    """The kind of an episode dict, by its keys: the first of `KINDS` (most specific first) whose keys it holds."""
    if isinstance(episodes, dict):
        for kind, keys in KINDS.items():
            if all(k in episodes for k in keys):
                return kind
    found = sorted(episodes) if isinstance(episodes, dict) else type(episodes).__name__
    kinds = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in KINDS.items())
    raise ValueError(f"episodes must be a dict with the keys of one of the kinds of tfmeta.episodes ({kinds}); got "
                     f"{found}.")


def is_stream(episode: dict) -> bool:
    """Whether an episode's support data is a stream of batches (`stream_x`, `stream_y`), one per inner step."""
    return "stream_x" in episode
