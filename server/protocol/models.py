"""The Runware wire protocol as pydantic models: tasks and result items (error items are in `errors`).

Everything here is plain data: no torch, no transport. The contract is the public Runware page of
`runware:kandinsky-5.0-image-lite@1` (ranges, defaults and allowed values below are copied from it) and
the protocol notes on how the official SDKs read the answers.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from .errors import DOCS_URL, ErrorItem  # noqa: F401 - DOCS_URL: the model page, named here too

MODEL_ID = "runware:kandinsky-5.0-image-lite@1"

# (width, height) pairs the model page allows; width and height must be given together.
ALLOWED_SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (640, 1408),
    (1408, 640),
    (768, 1280),
    (1280, 768),
    (896, 1152),
    (1152, 896),
)

# Runware's scheduler names for this model; pipelines.schedulers maps each onto a flow-matching sampler.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Exponential",
    "DPM++ 2M SDE Karras",
    "Euler",
    "Euler a",
    "Euler Trailing",
    "LCM",
    "DDIM",
    "DDPM",
    "PNDM",
    "UniPC",
)

OUTPUT_TYPES = ("URL", "base64Data", "dataURI")
OUTPUT_FORMATS = ("JPG", "PNG", "WEBP")
MAX_SEED = 9223372036854775807
MAX_RANDOM_SEED = 2**32 - 1  # random seeds are drawn in the unsigned 32-bit range, as on Runware
MAX_TTL = 30 * 86400  # seconds; the page gives no maximum, this server keeps results at most 30 days
MAX_STEPS = 50
MAX_LORAS = 16  # per task
MAX_URL_LENGTH = 8192  # webhookURL / uploadEndpoint (presigned URLs run to a few KB)
TASK_TYPES = ("imageInference", "getResponse", "imageUpload", "modelSearch", "authentication", "ping")


def _case_insensitive(allowed: tuple[str, ...], aliases: dict[str, str] | None = None):
    """Before-validator: map any casing (and aliases) onto the canonical spelling; leave others for the Literal."""
    table = {a.lower(): a for a in allowed} | {k.lower(): v for k, v in (aliases or {}).items()}

    def convert(value: Any) -> Any:
        return table.get(value.lower(), value) if isinstance(value, str) else value

    return BeforeValidator(convert)


def _one_or_many(value: Any) -> Any:
    """`outputType` may be a string or a list of strings (the Python SDK sends `["URL"]`)."""
    return [value] if isinstance(value, str) else value


_Strict = ConfigDict(strict=True, extra="ignore")


def _enum(values) -> WithJsonSchema:
    """The schema names the values validation accepts (pydantic only sees the bounds or the type)."""
    values = list(values)
    return WithJsonSchema({"type": "integer" if isinstance(values[0], int) else "string", "enum": values})

OutputType = Annotated[Literal["URL", "base64Data", "dataURI"], _case_insensitive(OUTPUT_TYPES)]
OutputFormat = Annotated[
    Literal["JPG", "PNG", "WEBP"], _case_insensitive(OUTPUT_FORMATS, {"jpeg": "JPG"})
]


class LoraItem(BaseModel):
    model_config = _Strict

    model: str = Field(min_length=1, max_length=256)
    weight: float = Field(1.0, ge=-4, le=4)
    transformer: Literal["both", "high", "low"] = "both"


# The official Python SDK (IAcceleratorOptions, runware 0.5.24) spells three options differently from the
# model page; validation renames them before parsing.
SDK_ACCELERATOR_ALIASES = {"fbcache": "fbCache", "cacheDistance": "fbCacheThreshold", "cacheStopStep": "cacheEndStep"}


class AcceleratorOptions(BaseModel):
    model_config = _Strict

    teaCache: bool = False
    teaCacheDistance: float = Field(0.5, ge=0, le=1)
    fbCache: bool = False
    fbCacheThreshold: float = Field(0.25, ge=0, le=1)
    dbCache: bool = False
    dbCacheThreshold: float = Field(0.25, ge=0, le=1)
    dbCacheSkipInterval: int = Field(5, ge=1, le=MAX_STEPS)
    cacheStartStep: int | None = Field(None, ge=0, le=MAX_STEPS - 1)
    cacheEndStep: int | None = Field(None, ge=1, le=MAX_STEPS)
    cacheStartStepPercentage: int | None = Field(None, ge=0, le=99)
    cacheEndStepPercentage: int | None = Field(None, ge=1, le=100)
    cacheMaxConsecutiveSteps: int = Field(3, ge=1, le=5)
    # Sent by the official SDKs for other models; this model has no DeepCache (requests for it are refused).
    deepCache: bool = False

    @property
    def any_method(self) -> bool:
        return self.teaCache or self.fbCache or self.dbCache


class Safety(BaseModel):
    model_config = _Strict

    checkContent: bool = False
    mode: Literal["none", "fast"] | None = None
    checkInputs: bool = False

    @property
    def enabled(self) -> bool:
        # `mode` wins over `checkContent`; checkContent alone means "fast".
        return self.mode == "fast" if self.mode is not None else self.checkContent


ImageRef = Annotated[str, Field(min_length=1)]
# A client-chosen UUID, echoed byte for byte (so kept a string); validation.check_task_uuid checks it.
TaskUUID = Annotated[str, WithJsonSchema({"type": "string", "format": "uuid"})]


class Inputs(BaseModel):
    model_config = _Strict

    referenceImages: list[ImageRef] | None = Field(None, max_length=16)
    image: ImageRef | None = None
    seedImage: ImageRef | None = None
    mask: ImageRef | None = None


class ImageInferenceTask(BaseModel):
    """An `imageInference` task as the model page defines it. Other fields: `client_shapes` (served, refused, or
    ignored and logged)."""

    model_config = _Strict

    taskType: Literal["imageInference"]
    taskUUID: TaskUUID
    model: str = Field(max_length=256, examples=[MODEL_ID])
    positivePrompt: str = Field(min_length=2, max_length=32000)
    negativePrompt: str | None = Field(None, min_length=2, max_length=3000)
    # Only the pairs in ALLOWED_SIZES are accepted (validation checks the pair); the bounds keep echoes short.
    width: Annotated[int, _enum(sorted({w for w, _ in ALLOWED_SIZES}))] | None = Field(None, ge=1, le=4096)
    height: Annotated[int, _enum(sorted({h for _, h in ALLOWED_SIZES}))] | None = Field(None, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int = Field(20, ge=10, le=MAX_STEPS)
    scheduler: Annotated[str, _enum(SCHEDULER_NAMES)] | None = Field(None, max_length=64)
    CFGScale: float = Field(7.0, ge=2, le=10)
    numberResults: int = Field(1, ge=1, le=20)
    outputType: Annotated[
        list[OutputType],
        BeforeValidator(_one_or_many, json_schema_input_type=OutputType | list[OutputType]),
        Field(min_length=1, max_length=3),
    ] = ["URL"]
    outputFormat: OutputFormat = "JPG"
    outputQuality: int = Field(95, ge=20, le=99)
    includeCost: bool = False
    ttl: int | None = Field(None, ge=60, le=MAX_TTL)
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: str | None = Field(None, min_length=1, max_length=MAX_URL_LENGTH)
    uploadEndpoint: str | None = Field(None, min_length=1, max_length=MAX_URL_LENGTH)
    lora: list[LoraItem] = Field([], max_length=MAX_LORAS)
    acceleratorOptions: AcceleratorOptions | None = None
    safety: Safety | None = None
    checkNSFW: bool = False  # legacy synonym of safety.checkContent
    # Image inputs (image-to-image and editing); served by a later issue, validated now.
    seedImage: ImageRef | None = None
    strength: float = Field(0.8, ge=0, le=1)
    referenceImages: list[ImageRef] | None = Field(None, max_length=16)
    maskImage: ImageRef | None = None
    inputs: Inputs | None = None

    @property
    def safety_check(self) -> bool:
        return self.checkNSFW or (self.safety is not None and self.safety.enabled)

    @property
    def has_image_input(self) -> bool:
        i = self.inputs
        return bool(
            self.seedImage
            or self.referenceImages
            or self.maskImage
            or (i and (i.referenceImages or i.image or i.seedImage or i.mask))
        )


# Allowed values reported with `invalid...` errors, keyed by parameter path.
ALLOWED_VALUES: dict[str, list[Any]] = {
    "outputType": list(OUTPUT_TYPES),
    "outputFormat": list(OUTPUT_FORMATS),
    "scheduler": list(SCHEDULER_NAMES),
    "deliveryMethod": ["sync", "async"],
    "safety.mode": ["none", "fast"],
    "lora.transformer": ["both", "high", "low"],
    "width": sorted({w for w, _ in ALLOWED_SIZES}),
    "height": sorted({h for _, h in ALLOWED_SIZES}),
}


# -- the other task types ------------------------------------------------------------------------------------


class AuthenticationTask(BaseModel):
    """First frame of a WebSocket connection, or the first element of an HTTP body (instead of a header).
    The transports read it (and `ping`) themselves, before the dispatcher: a key that is not a string simply
    does not match."""

    model_config = _Strict

    taskType: Literal["authentication"]
    apiKey: str = Field(min_length=1)
    connectionSessionUUID: str | None = Field(None, description="resume this WebSocket session's results")


class PingTask(BaseModel):
    model_config = _Strict

    taskType: Literal["ping"]
    ping: bool | None = None


class GetResponseTask(BaseModel):
    """Poll an earlier task (any delivery method) by its own taskUUID."""

    model_config = _Strict

    taskType: Literal["getResponse"]
    taskUUID: TaskUUID


class ImageUploadTask(BaseModel):
    model_config = _Strict

    taskType: Literal["imageUpload"]
    taskUUID: TaskUUID
    image: str = Field(min_length=1, description="a data URI, base64 data, an http(s) URL or an imageUUID")


class ModelSearchTask(BaseModel):
    model_config = _Strict

    taskType: Literal["modelSearch"]
    taskUUID: TaskUUID
    search: str | None = Field(None, max_length=1000)
    category: str | None = Field(None, max_length=64, description="checkpoint or lora (this server's LoRA folder)")
    limit: int = Field(20, ge=1, le=100)
    offset: int = Field(0, ge=0, le=10000)


TASK_MODELS: tuple[type[BaseModel], ...] = (
    ImageInferenceTask, GetResponseTask, ImageUploadTask, ModelSearchTask, AuthenticationTask, PingTask,
)


def task_type_of(model: type[BaseModel]) -> str:
    """The `taskType` a task model accepts (its Literal)."""
    return model.model_fields["taskType"].annotation.__args__[0]


# -- what comes back -----------------------------------------------------------------------------------------

_Open = ConfigDict(extra="allow")


class ImageResult(BaseModel):
    """One image of an imageInference task (and, with `status: success`, of a getResponse answer)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"anyOf": [
        {"required": ["imageURL"]}, {"required": ["imageBase64Data"]}, {"required": ["imageDataURI"]}]})

    taskType: Literal["imageInference"]
    taskUUID: str
    imageUUID: str
    imageURL: str | None = None
    imageBase64Data: str | None = None
    imageDataURI: str | None = None
    seed: int
    NSFWContent: bool | None = None
    cost: float | None = None
    width: int | None = None  # only when the size came from an input image
    height: int | None = None
    status: Literal["success"] | None = None  # getResponse answers only

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ProcessingItem(BaseModel):
    model_config = _Open

    taskType: str
    taskUUID: str
    status: Literal["processing"]
    progress: int = Field(ge=0, le=100)


class Acknowledgement(BaseModel):
    """The immediate answer to an async task: exactly these two fields."""

    model_config = ConfigDict(extra="forbid")

    taskType: str
    taskUUID: str


class AuthenticationResult(BaseModel):
    model_config = _Open

    taskType: Literal["authentication"]
    connectionSessionUUID: str


class PongResult(BaseModel):
    model_config = _Open

    taskType: Literal["ping"]
    pong: Literal[True]


class ImageUploadResult(BaseModel):
    model_config = _Open

    taskType: Literal["imageUpload"]
    taskUUID: str
    imageUUID: str
    imageURL: str


class ModelInfo(BaseModel):
    model_config = _Open

    air: str
    name: str
    version: str
    category: str
    architecture: str
    tags: list[str]
    private: bool


class ModelSearchResult(BaseModel):
    model_config = _Open

    taskType: Literal["modelSearch"]
    taskUUID: str
    results: list[ModelInfo]
    totalResults: int


ResultItem = (ImageResult | ProcessingItem | AuthenticationResult | PongResult | ImageUploadResult
              | ModelSearchResult | Acknowledgement)


class TaskResponse(BaseModel):
    """Every answer of `POST /v1` and every WebSocket frame: results in task order, errors after them."""

    data: list[ResultItem] | None = None
    errors: list[ErrorItem] | None = None
