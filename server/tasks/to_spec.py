"""A validated imageInference task becomes the worker's `GenerationSpec` (shared by the server and
`k5serve generate`): its seed drawn when missing, its step-cache settings resolved (`step_cache`); a request the
worker refuses becomes the task's error (`input_error`). `result_items` translates the worker's output back."""

from __future__ import annotations

import secrets

from k5serve.accel import StepCacheConfig, resolve_window
from k5serve.pipelines.worker import GenerationSpec, InvalidInput

from ..protocol.errors import TaskError, task_error
from ..protocol.models import MAX_RANDOM_SEED, ImageInferenceTask


def to_spec(task: ImageInferenceTask, *, init_image=None, reference_image=None) -> GenerationSpec:
    """The validated request, as the worker's input. A missing seed is drawn here and reported back;
    without width/height the (already sized) input image decides the size."""
    seed = task.seed if task.seed is not None else secrets.randbelow(MAX_RANDOM_SEED + 1)
    sized = init_image or reference_image
    width, height = (task.width, task.height) if sized is None else sized.size
    return GenerationSpec(
        prompt=task.positivePrompt,
        negative_prompt=task.negativePrompt or "",
        width=width,
        height=height,
        seed=seed,
        steps=task.steps,
        guidance_scale=task.CFGScale,
        scheduler=task.scheduler,
        num_images=task.numberResults,
        loras=tuple((lora.model, lora.weight) for lora in task.lora),
        init_image=init_image,
        strength=task.strength,
        reference_image=reference_image,
        cache=step_cache(task),
        check_content=task.safety_check,
        task_id=task.taskUUID,
    )


def step_cache(task: ImageInferenceTask) -> StepCacheConfig | None:
    """acceleratorOptions (validated: one method, a non-empty window) as the pipeline's cache config."""
    acc = task.acceleratorOptions
    if acc is None or not acc.any_method:
        return None
    method, threshold = (("teacache", acc.teaCacheDistance) if acc.teaCache else
                         ("fbcache", acc.fbCacheThreshold) if acc.fbCache else ("dbcache", acc.dbCacheThreshold))
    start, end = resolve_window(task.steps, acc.cacheStartStep, acc.cacheEndStep, acc.cacheStartStepPercentage,
                                acc.cacheEndStepPercentage)
    return StepCacheConfig(method=method, threshold=threshold, start_step=start, end_step=end,
                           max_consecutive=acc.cacheMaxConsecutiveSteps, skip_interval=acc.dbCacheSkipInterval)


def input_error(exc: InvalidInput, task_type: str, task_uuid: str) -> TaskError:
    """A request the worker refused (e.g. a LoRA file that is not there), as the task's Runware error."""
    return task_error(exc.code, str(exc), parameter=exc.parameter, task_type=task_type, task_uuid=task_uuid)
