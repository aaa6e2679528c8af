"""Task types on the task slot (see :mod:`vpeft.tasks.base`): classification, segmentation, detection,
video, zero-shot (vision-language); importing this package
registers every built-in task type."""

from .base import Meter, Task, TaskModel, register_task, task_for_folder, task_from_dict, task_kinds
from .classification import ClassificationMeter, ClassificationTask
from .detection import DetectionMeter, DetectionModel, DetectionTask
from .segmentation import SegmentationMeter, SegmentationModel, SegmentationTask
from .video import VideoModel, VideoTask
from .zeroshot import ZeroShotModel, ZeroShotTask

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
    "DetectionMeter",
    "DetectionModel",
    "DetectionTask",
    "SegmentationMeter",
    "SegmentationModel",
    "SegmentationTask",
    "VideoModel",
    "VideoTask",
    "ZeroShotModel",
    "ZeroShotTask",
]
