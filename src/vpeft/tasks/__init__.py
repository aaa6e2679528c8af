"""Task types on the task slot (see :mod:`vpeft.tasks.base`): classification today, more as modules beside it."""

from .base import Meter, Task, TaskModel, register_task, task_for_folder, task_from_dict, task_kinds
from .classification import ClassificationMeter, ClassificationTask

__all__ = [
    "Meter",
    "Task",
    "TaskModel",
    "register_task",
    "task_for_folder",
    "task_from_dict",
    "task_kinds",
    "ClassificationMeter",
    "ClassificationTask",
]
