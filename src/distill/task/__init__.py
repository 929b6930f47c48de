"""The flagship task: personalised training programs for airline pilots and cabin crew."""

from distill.task.catalog import Catalog, Exercise, TaskInputError, load_catalog
from distill.task.checks import CHECKS, Violation, check_program, check_program_obj, is_valid, quality_score
from distill.task.corpus import corpus_texts
from distill.task.history import LoggedExercise, LoggedWorkout, sample_history
from distill.task.planner import plan_program
from distill.task.profile import GOALS, ROLES, Profile, sample_profile
from distill.task.program import (
    Prescription, Program, ProgramParseError, Workout, parse_program, program_from_json, program_to_json, render_program,
)  # fmt: skip
from distill.task.prompt import make_instance, render_prompt

__all__ = [
    "CHECKS", "GOALS", "ROLES", "Catalog", "Exercise", "LoggedExercise", "LoggedWorkout", "Prescription", "Profile",
    "Program", "ProgramParseError", "TaskInputError", "Violation", "Workout", "check_program", "check_program_obj",
    "corpus_texts", "is_valid", "load_catalog", "make_instance", "parse_program", "plan_program", "program_from_json",
    "program_to_json", "quality_score", "render_program", "render_prompt", "sample_history", "sample_profile",
]  # fmt: skip
