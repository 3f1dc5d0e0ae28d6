"""LUFFY's system prompt and the message list a problem becomes."""

from __future__ import annotations

# Verbatim from LUFFY's data/valid.all.parquet and luffy/scripts/data/prepare_openr1_data_v6.py L80
# ; its \n are real newlines, as in the parquet. Training rows and
# in-training validation rows carry it; the final evaluation removes it (remove_system=True). Do not edit: a
# model trained with it expects this exact text (a test compares it with LUFFY's own validation files).
LUFFY_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
    "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
    "multiple iterations. Structure your response into two sections: Thought and Solution. In the Thought "
    'section, present your reasoning using the format: "<think>\n {thoughts} </think>\n". Each thought should '
    'include detailed analysis, brainstorming, verification, and refinement of ideas. After "</think>\n," in '
    "the Solution section, provide the final, logical, and accurate answer, clearly derived from the "
    "exploration in the Thought section. If applicable, include the answer in \\boxed{} for closed-form results "
    "like multiple choices or mathematical solutions."
)

# A short alternative for tiny CPU demo models, whose 1024-token prompt budget and attention span are small.
SHORT_SYSTEM_PROMPT = "Think step by step inside <think> </think>, then give the final answer in \\boxed{}."

SYSTEM_PROMPTS = {"luffy": LUFFY_SYSTEM_PROMPT, "short": SHORT_SYSTEM_PROMPT, "none": ""}


def make_prompt(problem: str, system_prompt: str = LUFFY_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The ``prompt`` column of a LUFFY row: ``[system, user]``, or ``[user]`` when system_prompt is empty."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": problem})
    return messages
