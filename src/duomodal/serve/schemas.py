"""Request and response bodies of the HTTP API (pydantic), with the bounds every request obeys."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    create_model,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from duomodal.models.sampling import SAMPLING, SEED, SamplingOptions, Setting, sampling_settings
from duomodal.search.filters import FORMAT_NAMES, SIZE_PATTERN, SORTS
from duomodal.search.hybrid import DEFAULT_TEXT_WEIGHT, MAX_TEXT_WEIGHT
from duomodal.search.query import QUERY_PATTERN, SPACE_CHARS, QueryError, parse_query

MAX_K = 200  # most results one search may ask for
MAX_QUERY_CHARS = 500  # longest text query / prompt accepted (search/query.py's limit too)
MAX_ID = 2**63 - 1  # ids are int64 in the vector index
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


# Text a prompt may hold: no control characters, and something besides spaces.
_CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
PROMPT_PATTERN = f"^[^{_CONTROL}]*[^{_CONTROL}{SPACE_CHARS}][^{_CONTROL}]*$"


@dataclass(frozen=True)
class TextRule:
    """A text field's rule, stated in the OpenAPI schema as `pattern` and enforced here with the
    same expression (a client generated from the schema never sends text the server refuses); the
    value is then stripped. `explain` turns a refused text into the reason the user reads."""

    pattern: str
    explain: Callable[[str], str]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        expression = re.compile(self.pattern)

        def check(value: str) -> str:
            if not expression.fullmatch(value):
                raise ValueError(self.explain(value))
            return value.strip()

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler.resolve_ref_schema(handler(schema))
        json_schema["pattern"] = self.pattern
        return json_schema


def _has_control(value: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value)


def _explain_words(value: str) -> str:
    if _has_control(value):
        return "should not contain control characters (NUL, tabs, line breaks...)"
    return "should contain words, not only spaces: type what the image shows"


def _explain_query(value: str) -> str:
    if not _has_control(value):
        try:
            parse_query(value)
        except QueryError as e:
            return str(e)
    return _explain_words(value)


# A prompt: words, no control characters. A search query: the same, in the query syntax of
# search/query.py (terms, "-" negatives, "W*" weights, at least one positive term).
Words = TextRule(PROMPT_PATTERN, _explain_words)
QueryText = TextRule(QUERY_PATTERN, _explain_query)


def _a_json_number(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        raise ValueError(f"should be a number, not {type(value).__name__} {value!r}")
    return value


def json_number(kind: type, **bounds: float) -> Any:
    """A number of a JSON body, read as JSON Schema reads it: 6.0 is the integer 6, but true and "6"
    are not numbers (pydantic's lax mode would take both). The bounds (ge, gt, le) sit on the number
    itself, so the schema states them as `minimum`, `exclusiveMinimum`, `maximum`."""
    return Annotated[kind, Field(**bounds), BeforeValidator(_a_json_number)]




class ErrorResponse(BaseModel):
    """Every 4xx answer: one human-readable line."""

    detail: str = Field(description="what was wrong with the request and what to do instead")


TEXT_WEIGHT_HELP = (
    "in an index with words (--ocr): the weight of the words' ranking against CLIP's (0: pictures only)"
)


class SearchFilterFields(BaseModel):
    """Filters and a cut-off on text search (duomodal.search.filters; the CLI's options of the same names).
    Extra fields are allowed here: GET /api/search reads these beside q, k and text_weight."""

    folder: str | None = Field(default=None, max_length=1000, description="only images under this folder of the index")
    after: datetime | date | None = Field(default=None, description="only files modified at or after this "
                                          "date or date-time (local time on the server unless it says otherwise)")
    before: datetime | date | None = Field(default=None, description="only files modified before this")
    min_size: str | None = Field(default=None, max_length=40, pattern=SIZE_PATTERN,
                                 description="only files of at least this size: bytes, or 250k, 2M, 1.5G")
    max_size: str | None = Field(default=None, max_length=40, pattern=SIZE_PATTERN,
                                 description="only files of at most this size")
    format: list[Literal[FORMAT_NAMES]] = Field(default_factory=list, max_length=16,
                                                description="only these formats")
    # (the bounds sit on the number itself, so the schema states them as minimum/maximum; not json_number:
    # GET /api/search reads these from the query string)
    min_score: Annotated[float, Field(ge=-1, le=1)] | None = Field(
        default=None, description="only results whose CLIP score is at least this")
    sort: Literal[SORTS] = Field(default="score", description="score (best first) or date (newest first)")


class TextSearchRequest(SearchFilterFields):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, QueryText] = Field(
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description='words describing the image; "-word" subtracts, "2*word" weights',
        examples=["a red heart icon"],
    )
    k: json_number(int, ge=1, le=MAX_K) = Field(default=24, description="number of results")  # type: ignore[valid-type]
    text_weight: json_number(float, ge=0, le=MAX_TEXT_WEIGHT) = Field(  # type: ignore[valid-type]
        default=DEFAULT_TEXT_WEIGHT, description=TEXT_WEIGHT_HELP)


class SearchMatch(BaseModel):
    """Why an image matched a text query in an index with words (built with --ocr)."""

    fused: float = Field(description="the reciprocal-rank-fusion score the results are ordered by")
    clip_rank: int = Field(description="the image's rank by CLIP similarity among the candidates")
    text_rank: int | None = Field(description="its rank by the words (BM25), null when its words do not match")
    matched_words: list[str] = Field(description="the query's words found in the image")
    why: str = Field(description="the same in words")


class SearchHit(BaseModel):
    id: int = Field(description="the image's id in the index; use it for /api/image/{id}")
    score: float = Field(description="cosine similarity to the query, higher is closer")
    path: str = Field(description="the file's path as recorded in the index")
    width: int
    height: int
    caption: str | None = None
    image_url: str
    thumb_url: str
    words: str | None = Field(default=None, description="the words read in the image (an index built with --ocr)")
    match: SearchMatch | None = Field(default=None, description="why it matched a text query (with --ocr)")


class SearchResponse(BaseModel):
    kind: Literal["text", "image", "similar"]
    query: str = Field(description="the text query, the uploaded file's name, or the source id")
    took_ms: float = Field(description="time spent decoding (an upload), embedding and searching, in ms")
    results: list[SearchHit]
    note: str | None = Field(
        default=None,
        description="why there are no results when the query is well-formed but means nothing "
        "(its terms cancel out, as in \"cat -cat\")",
    )


class HealthResponse(BaseModel):
    status: Literal["ok"]
    images: int = Field(description="number of images in the index")
    dim: int
    clip_model_id: str
    generation: bool = Field(description="whether /api/generate and /api/edit are available")
    max_k: int
    max_upload_bytes: int
    max_generate: int = Field(description="largest `num` /api/generate accepts (0 when off)")


# --- generation: the sampling settings, derived from duomodal.models.sampling.SamplingOptions ---------

# what a generation request may choose: every per-call sampling setting and the seed
REQUEST_SETTINGS = sampling_settings(SAMPLING, SEED)


def _bounds(setting: Setting) -> dict[str, Any]:
    """The setting's bounds as pydantic names them."""
    low = {"gt": setting.minimum} if setting.above_minimum else {"ge": setting.minimum}
    return {**low, "le": setting.maximum}


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _setting_field(setting: Setting, form: bool) -> tuple[Any, Any]:
    """A sampling setting as a field of a JSON body or (`form`) of a multipart form. A form field has
    no null (a form part cannot carry one): a setting that is off by default is simply left out."""
    if setting.switch:
        return (bool if form else StrictBool), Field(default=setting.public(setting.default), description=setting.help)
    kind: Any = Annotated[setting.kind, Field(**_bounds(setting))] if form else json_number(setting.kind,
                                                                                               **_bounds(setting))
    if setting.default is None and form:
        return kind, Field(default=None, description=setting.help, json_schema_extra=_no_default)
    if setting.optional and not form:
        kind = kind | None
    return kind, Field(default=setting.default, description=setting.help)


def _setting_fields(form: bool) -> dict[str, Any]:
    return {setting.public_name: _setting_field(setting, form) for setting in REQUEST_SETTINGS}


def sampling_options(request: BaseModel) -> SamplingOptions:
    """The SamplingOptions of a generation request or form (batch size and precision: the defaults)."""
    return SamplingOptions(**{s.name: s.from_public(getattr(request, s.public_name)) for s in REQUEST_SETTINGS})


def settings_of(request: BaseModel) -> dict[str, Any]:
    """The sampling settings and the seed of a request, as the job echoes them (`JobSettings`)."""
    return {s.public_name: getattr(request, s.public_name) for s in REQUEST_SETTINGS}


def _keep_at_most_num(num: int | None, keep: int | None) -> None:
    if keep is not None and num is not None and keep > num:
        raise ValueError(f"keep ({keep}) is larger than num ({num}): keep at most num")


class _GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, Words] = Field(min_length=1, max_length=MAX_QUERY_CHARS, examples=["a red heart icon"])
    num: json_number(int, ge=1) | None = Field(  # type: ignore[valid-type]
        default=None, description="images to sample (default 16, or /health max_generate when that is lower; at "
        "most max_generate)")
    keep: json_number(int, ge=1) | None = Field(  # type: ignore[valid-type]
        default=None, description="keep the best `keep` by CLIP score (default: all)")

    @model_validator(mode="after")
    def _keep_at_most_num(self) -> _GenerateBody:
        _keep_at_most_num(self.num, self.keep)
        return self


GenerateRequest = create_model("GenerateRequest", __base__=_GenerateBody, **_setting_fields(form=False))


def _optional_count(description: str) -> Any:
    """A form's optional count: an integer when given (a form part cannot carry null)."""
    return Field(default=None, ge=1, description=description, json_schema_extra=_no_default)


class _ImageForm(BaseModel):
    """The fields of an edit or completion form beside the image file."""

    prompt: Annotated[str, Words] = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    num: int = _optional_count("images to sample (default 8, or /api/generator max_generate when that is lower; "
                               "at most max_generate)")
    keep: int = _optional_count("keep the best `keep` (default: all)")


_SamplingForm = create_model("_SamplingForm", __base__=_ImageForm, **_setting_fields(form=True))
MAX_BOX_COORD = 1_000_000


class EditForm(_SamplingForm):  # type: ignore[misc, valid-type]
    left: int = Field(ge=0, le=MAX_BOX_COORD, description="box, in image pixels")
    top: int = Field(ge=0, le=MAX_BOX_COORD)
    right: int = Field(ge=1, le=MAX_BOX_COORD)
    bottom: int = Field(ge=1, le=MAX_BOX_COORD)


class CompleteForm(_SamplingForm):  # type: ignore[misc, valid-type]
    # at most the model's grid rows - 1: stated in the served schema, checked by the route
    rows: int = Field(ge=0, description="token rows to keep, from the top (less than the model's grid)")


class GeneratedImage(BaseModel):
    index: int = Field(description="position in the result, best first when scored")
    url: str = Field(description="PNG of the image")
    score: float | None = Field(description="the image's score, higher is better (see score_kind)")
    seed: int | None = Field(default=None, description="the seed that alone reproduces this image")
    sample: int | None = Field(default=None, description="the image's position in sampling order")


class JobResult(BaseModel):
    prompt: str
    score_kind: Literal["clip", "fit"] | None = Field(
        description="clip: CLIP similarity to the prompt; fit: how well an edit fits the rest of "
        "the image (mean log-likelihood); None: not scored"
    )
    images: list[GeneratedImage] = Field(description="the kept images, best first")
    samples: list[GeneratedImage] = Field(
        default_factory=list,
        description="every sample in sampling order, `index` being its rank by score (to compare the "
        "reranked order with the sampling order)",
    )


class JobPreviewBody(BaseModel):
    first: int = Field(description="the sample the first preview image shows")
    rows: int = Field(description="token rows drawn so far")
    grid_rows: int = Field(description="token rows in all")
    version: int = Field(description="changes with every new preview; add it to the image URLs")
    images: list[str] = Field(description="PNG URLs of the partial images")


class _JobCounts(BaseModel):
    """What the job was asked for: with the prompt (and the source image) it reproduces the result."""

    num: int
    keep: int | None = None
    box: list[int] | None = Field(default=None, description="edit: left, top, right, bottom in model pixels")
    rows: int | None = Field(default=None, description="complete: token rows kept from the image")


JobSettings = create_model("JobSettings", __base__=_JobCounts, **{
    s.public_name: (s.kind if s.role == SEED else (bool if s.switch else s.kind) | None,
                    Field(... if s.role == SEED else None, description=s.help))
    for s in REQUEST_SETTINGS
})


class JobResponse(BaseModel):
    id: str
    kind: Literal["generate", "edit", "complete"]
    status: Literal["queued", "running", "cancelling", "done", "failed", "cancelled"]
    done: int = Field(description="steps finished so far")
    total: int = Field(description="steps in all (0 until known)")
    progress: float = Field(ge=0.0, le=1.0)
    error: str | None = None
    prompt: str = ""
    created: float = Field(default=0.0, description="when the job was submitted, seconds since 1970")
    settings: JobSettings | None = None
    preview: JobPreviewBody | None = Field(
        default=None, description="partial images while a batch samples (null before the first and once finished)"
    )
    result: JobResult | None = None
    url: str = Field(description="poll this for progress and the result")


class SettingInfo(BaseModel):
    """A sampling setting a generation request may choose, with its default and bounds."""

    name: str
    type: Literal["integer", "number", "boolean"]
    default: float | bool | None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = Field(default=False, description="the minimum itself is refused")
    description: str


def setting_infos() -> list[SettingInfo]:
    infos = []
    for s in REQUEST_SETTINGS:
        kind = "boolean" if s.switch else {int: "integer", float: "number"}[s.kind]
        infos.append(SettingInfo(name=s.public_name, type=kind, default=s.public(s.default), minimum=s.minimum,
                                 maximum=s.maximum, exclusive_minimum=s.above_minimum, description=s.help))
    return infos


class GeneratorInfo(BaseModel):
    image_size: int = Field(description="the model's image side in pixels; uploads are fitted to it")
    grid_size: int = Field(description="token grid side: a box snaps to cells of image_size / grid_size pixels")
    max_generate: int = Field(description="largest `num` a job may ask for")
    guidance: float = Field(description="default classifier-free guidance scale")
    top_k: int | None = Field(description="default top-k")
    settings: list[SettingInfo] = Field(description="every sampling setting a request may choose")
