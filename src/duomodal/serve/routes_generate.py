"""Generation routes (only when the server has a DALL-E run): text -> images reranked by CLIP,
region edits, completions, and the background jobs that run them (progress, partial previews as
polled JSON or server-sent events, cancelling)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Path, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from duomodal.serve.jobs import Job, JobFinishedError, JobOutput
from duomodal.serve.media import encode_png
from duomodal.serve.schemas import (
    JOB_ID_PATTERN,
    CompleteForm,
    EditForm,
    ErrorResponse,
    GeneratedImage,
    GenerateRequest,
    GeneratorInfo,
    JobPreviewBody,
    JobResponse,
    JobResult,
    JobSettings,
    sampling_options,
    setting_infos,
    settings_of,
)
from duomodal.models.sampling import SamplingOptions
from duomodal.serve.protocols import Generator
from duomodal.serve.state import ServerState, server_state

SUBMIT_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 429)}
LOOKUP_ERRORS = {status: {"model": ErrorResponse} for status in (404, 422)}
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the id /api/generate answered")]
ImageNumber = Annotated[int, Path(ge=0, le=10_000)]
EVENT_POLL_S = 0.1  # how often an event stream looks at its job
MAX_EVENT_STREAM_S = 3600.0  # an event stream ends after this; the client reconnects or polls
EDIT_NUM = 8  # the default `num` of an edit or a completion
GENERATE_NUM = 16  # the default `num` of /api/generate

State = Annotated[ServerState, Depends(server_state)]
router = APIRouter(prefix="/api", tags=["generate"])


def the_generator(state: State) -> Generator:
    if state.generator is None:  # the routes are only mounted with a generator
        raise HTTPException(status_code=404, detail="this server has no DALL-E run: generation is off")
    return state.generator


TheGenerator = Annotated[Generator, Depends(the_generator)]


def _images(job_id: str, output: JobOutput, numbers: list[int]) -> list[GeneratedImage]:
    return [
        GeneratedImage(
            index=n,
            url=f"/api/jobs/{job_id}/images/{n}",
            score=None if output.scores is None else float(output.scores[n]),
            seed=None if output.seeds is None else int(output.seeds[n]),
            sample=None if output.sample_indices is None else int(output.sample_indices[n]),
        )
        for n in numbers
    ]


def job_response(job: Job) -> JobResponse:
    result = None
    if job.status == "done" and job.output is not None:
        output = job.output
        count = len(output.images)
        kept = min(count, output.keep or count)
        by_sample = list(range(count))
        if output.sample_indices is not None:
            by_sample.sort(key=lambda n: output.sample_indices[n])
        result = JobResult(prompt=job.prompt, score_kind=output.score_kind,
                           images=_images(job.id, output, list(range(kept))), samples=_images(job.id, output, by_sample))
    preview = None
    if job.preview is not None and not job.finished:
        p = job.preview
        preview = JobPreviewBody(
            first=p.first, rows=p.rows, grid_rows=p.grid_rows, version=p.version,
            images=[f"/api/jobs/{job.id}/preview/{n}?v={p.version}" for n in range(len(p.images))],
        )
    return JobResponse(
        id=job.id,
        kind=job.kind,
        status=job.status,
        done=job.done,
        total=job.total,
        progress=job.progress,
        error=job.error,
        prompt=job.prompt,
        created=job.created,
        settings=JobSettings(**job.settings) if job.settings else None,
        preview=preview,
        result=result,
        url=f"/api/jobs/{job.id}",
    )


def _accepted(job: Job) -> JSONResponse:
    body = job_response(job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": body["url"]})


def _client(request: Request) -> str:
    """Who a job counts against for the per-client cap: the peer address."""
    return request.client.host if request.client is not None else ""


def check_num(generator: Generator, num: int | None, keep: int | None, default: int = EDIT_NUM) -> int:
    """The `num` to sample (`default`, or max_num when lower, when not given); 422 when out of bounds."""
    num = min(default, generator.max_num) if num is None else num
    if num > generator.max_num:
        raise HTTPException(status_code=422,
                            detail=f"num: {num} is more than this server generates at once ({generator.max_num})")
    if keep is not None and keep > num:
        raise HTTPException(status_code=422, detail=f"keep ({keep}) is larger than num ({num}): keep at most num")
    return num


def read_image(state: ServerState, file: UploadFile) -> Image.Image:
    name = file.filename or "the upload"
    return state.files.decode_upload(file.file.read(state.files.max_upload_bytes + 1), name)


def found(state: ServerState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id} (finished jobs are kept a while)")
    return job


@router.get("/generator", response_model=GeneratorInfo)
def generator_info(generator: TheGenerator) -> GeneratorInfo:
    """The model's image size and token grid (a box snaps to its cells), and the sampling settings."""
    defaults = SamplingOptions()
    return GeneratorInfo(image_size=int(generator.image_size), grid_size=int(generator.grid_size),
                         max_generate=int(generator.max_num), guidance=defaults.guidance, top_k=defaults.top_k,
                         settings=setting_infos())


@router.post("/generate", status_code=202, response_model=JobResponse, responses=SUBMIT_ERRORS)
def generate(request: GenerateRequest, http: Request, state: State, generator: TheGenerator) -> JSONResponse:
    """Start generating images for a prompt; poll the returned job for progress and results.

    With `keep`, the `num` samples are reranked by CLIP and the best `keep` are returned.
    """
    num = check_num(generator, request.num, request.keep, GENERATE_NUM)
    options = sampling_options(request)

    def work(control):
        return generator.generate(request.prompt, num=num, keep=request.keep, options=options, control=control)

    settings = {**settings_of(request), "num": num, "keep": request.keep}
    return _accepted(state.jobs.submit("generate", request.prompt, work, client=_client(http), settings=settings))


@router.post("/edit", status_code=202, response_model=JobResponse, responses=SUBMIT_ERRORS)
def edit(http: Request, state: State, generator: TheGenerator, form: Annotated[EditForm, Form()],
         file: Annotated[UploadFile, File(description="the image to edit")]) -> JSONResponse:
    """Start regenerating the box (left, top, right, bottom) of an uploaded image from a prompt.

    The image is fitted to the model (shorter side scaled, centre square) and the box moved with
    it; the tokens the box touches are sampled again, every other pixel is kept.
    """
    num = check_num(generator, form.num, form.keep)
    image = read_image(state, file)
    left, top, right, bottom = form.left, form.top, form.right, form.bottom
    if not (left < right <= image.width and top < bottom <= image.height):
        raise HTTPException(
            status_code=422,
            detail=f"box ({left}, {top}, {right}, {bottom}) must lie inside the "
            f"{image.width}x{image.height} image with left < right and top < bottom",
        )
    image, box = generator.prepare_edit(image, (left, top, right, bottom))
    options = sampling_options(form)

    def work(control):
        return generator.edit(image, box, form.prompt, num=num, keep=form.keep, options=options, control=control)

    settings = {**settings_of(form), "num": num, "keep": form.keep, "box": list(box)}
    return _accepted(state.jobs.submit("edit", form.prompt, work, client=_client(http), settings=settings))


@router.post("/complete", status_code=202, response_model=JobResponse, responses=SUBMIT_ERRORS)
def complete(http: Request, state: State, generator: TheGenerator, form: Annotated[CompleteForm, Form()],
             file: Annotated[UploadFile, File(description="the image whose top rows to keep")]) -> JSONResponse:
    """Start completing an image: keep its top `rows` token rows and let the model draw the rest
    (the paper's priming). The image is fitted to the model first; see /api/generator for its grid."""
    most = max(0, int(generator.grid_size) - 1)  # the model's bound, stated in the served schema too
    if form.rows > most:
        raise HTTPException(status_code=422, detail=f"rows: Input should be less than or equal to {most}")
    num = check_num(generator, form.num, form.keep)
    image = generator.prepare_image(read_image(state, file))
    options = sampling_options(form)

    def work(control):
        return generator.complete(image, form.rows, form.prompt, num=num, keep=form.keep, options=options,
                                  control=control)

    settings = {**settings_of(form), "num": num, "keep": form.keep, "rows": form.rows}
    return _accepted(state.jobs.submit("complete", form.prompt, work, client=_client(http), settings=settings))


@router.get("/jobs/{job_id}", response_model=JobResponse, responses=LOOKUP_ERRORS)
def job(job_id: JobId, state: State) -> JobResponse:
    """Progress of a generation job, its partial previews while it samples and, once done, its
    images (best first) with their scores and seeds."""
    return job_response(found(state, job_id))


@router.delete("/jobs/{job_id}", response_model=JobResponse, responses={**LOOKUP_ERRORS, 409: {"model": ErrorResponse}})
def cancel(job_id: JobId, state: State) -> JobResponse:
    """Cancel a job: a queued one never starts ("cancelled"); a running one stops at its next
    token row ("cancelling", then "cancelled"). 409 when it has already finished."""
    try:
        job = state.jobs.cancel(job_id)
    except JobFinishedError as e:
        raise HTTPException(status_code=409, detail=str(e)) from None
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id} (finished jobs are kept a while)")
    return job_response(job)


async def _job_events(state: ServerState, job_id: str, request: Request) -> AsyncIterator[str]:
    last: Any = None
    waited = 0.0
    while waited < MAX_EVENT_STREAM_S:
        job = state.jobs.get(job_id)
        if job is None:
            return
        now = (job.status, job.done, job.total, None if job.preview is None else job.preview.version)
        if now != last:
            last = now
            yield f"data: {json.dumps(job_response(job).model_dump(mode='json'))}\n\n"
        if job.finished or await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)
        waited += EVENT_POLL_S


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "one `data:` line of the job (as GET /api/jobs/{job_id}) per change, "
                                    "until it finishes"},
               **LOOKUP_ERRORS},
)
async def events(job_id: JobId, request: Request, state: State) -> StreamingResponse:
    """The job as server-sent events: its state whenever progress, status or preview changes."""
    found(state, job_id)
    return StreamingResponse(_job_events(state, job_id, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.get(
    "/jobs/{job_id}/images/{n}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **LOOKUP_ERRORS},
)
def job_image(job_id: JobId, n: ImageNumber, state: State) -> Response:
    """The n-th image of a finished job (by rank), as PNG."""
    job = state.jobs.get(job_id)
    if job is None or job.status != "done" or job.output is None:
        raise HTTPException(status_code=404, detail=f"job {job_id} has no images (yet)")
    if n >= len(job.output.images):
        raise HTTPException(status_code=404, detail=f"job {job_id} has {len(job.output.images)} images, not {n + 1}")
    return Response(encode_png(job.output.images[n]), media_type="image/png")


@router.get(
    "/jobs/{job_id}/preview/{n}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, **LOOKUP_ERRORS},
)
def job_preview(job_id: JobId, n: ImageNumber, state: State) -> Response:
    """The n-th partial image of the batch a running job is sampling, as PNG (the last preview
    stays readable until the job is forgotten)."""
    job = state.jobs.get(job_id)
    preview = None if job is None else job.preview
    if preview is None or n >= len(preview.images):
        raise HTTPException(status_code=404, detail=f"job {job_id} has no preview {n} (now)")
    return Response(encode_png(preview.images[n]), media_type="image/png", headers={"Cache-Control": "no-store"})
