"""Evaluation: the closed-answer parser, benchmark loaders, metrics and the `pathchat eval` runner."""

from pathchat.evaluation.answers import FAILED, ParsedAnswer, parse_closed_answer
from pathchat.evaluation.tasks import TASKS, Question, TaskData, load_task

__all__ = ["FAILED", "TASKS", "ParsedAnswer", "Question", "TaskData", "load_task", "parse_closed_answer"]
