"""The softmax-attention teacher: loaded whole (`loading`), or read block by block from its files
(`streaming`) when it does not fit, or need not be, in one process's memory."""

from linearize.teacher.loading import (
    CACHE_FORMAT,
    CACHE_MARKER,
    DEFAULT_TEACHER,
    EMBEDDED_TEACHERS,
    TeacherInfo,
    check_model_type,
    default_cache_dir,
    load_teacher,
    load_teacher_config,
    load_tokenizer,
    teacher_directory,
    teacher_license,
)
from linearize.teacher.streaming import FileWeights, InMemory

__all__ = [
    "CACHE_FORMAT", "CACHE_MARKER", "DEFAULT_TEACHER", "EMBEDDED_TEACHERS", "FileWeights", "InMemory", "TeacherInfo",
    "check_model_type", "default_cache_dir", "load_teacher", "load_teacher_config", "load_tokenizer",
    "teacher_directory", "teacher_license",
]
