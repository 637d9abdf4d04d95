"""Generation routes (only when the server has a DALL-E run): text -> images reranked by CLIP,
region edits, and the background jobs that run them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Path, UploadFile
from fastapi.responses import JSONResponse, Response

from duomodal.serve.jobs import Job
from duomodal.serve.media import decode_upload, encode_png
from duomodal.serve.schemas import (
    JOB_ID_PATTERN,
    MAX_QUERY_CHARS,
    MAX_SEED,
    ErrorResponse,
    GeneratedImage,
    GenerateRequest,
    JobResponse,
    JobResult,
    Words,
)
from duomodal.serve.state import ServerState

SUBMIT_ERRORS = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422, 429)}
LOOKUP_ERRORS = {status: {"model": ErrorResponse} for status in (404, 422)}
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the id /api/generate answered")]
MAX_BOX_COORD = 1_000_000


def job_response(job: Job) -> JobResponse:
    result = None
    if job.status == "done" and job.output is not None:
        scores = job.output.scores
        images = [
            GeneratedImage(
                index=n,
                url=f"/api/jobs/{job.id}/images/{n}",
                score=None if scores is None else float(scores[n]),
            )
            for n in range(len(job.output.images))
        ]
        result = JobResult(prompt=job.prompt, score_kind=job.output.score_kind, images=images)
    return JobResponse(
        id=job.id,
        kind=job.kind,
        status=job.status,
        done=job.done,
        total=job.total,
        progress=job.progress,
        error=job.error,
        result=result,
        url=f"/api/jobs/{job.id}",
    )


def _accepted(job: Job) -> JSONResponse:
    body = job_response(job).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": body["url"]})


def make_generate_router(state: ServerState) -> APIRouter:
    generator = state.generator
    if generator is None:
        raise ValueError("make_generate_router needs a generator: the server has no DALL-E run")
    router = APIRouter(prefix="/api", tags=["generate"])

    def check_num(num: int, keep: int | None) -> None:
        if num > generator.max_num:
            raise HTTPException(
                status_code=422,
                detail=f"num: {num} is more than this server generates at once ({generator.max_num})",
            )
        if keep is not None and keep > num:
            raise HTTPException(
                status_code=422, detail=f"keep ({keep}) is larger than num ({num}): keep at most num"
            )

    @router.post("/generate", status_code=202, response_model=JobResponse, responses=SUBMIT_ERRORS)
    def generate(request: GenerateRequest) -> JSONResponse:
        """Start generating images for a prompt; poll the returned job for progress and results.

        With `keep`, the `num` samples are reranked by CLIP and the best `keep` are returned.
        """
        check_num(request.num, request.keep)

        def work(progress):
            return generator.generate(
                request.prompt,
                num=request.num,
                keep=request.keep,
                guidance=request.guidance,
                temperature=request.temperature,
                top_k=request.top_k,
                seed=request.seed,
                progress=progress,
            )

        return _accepted(state.jobs.submit("generate", request.prompt, work))

    @router.post("/edit", status_code=202, response_model=JobResponse, responses=SUBMIT_ERRORS)
    def edit(
        file: Annotated[UploadFile, File(description="the image to edit")],
        prompt: Annotated[str, Form(min_length=1, max_length=MAX_QUERY_CHARS), Words],
        left: Annotated[int, Form(ge=0, le=MAX_BOX_COORD, description="box, in image pixels")],
        top: Annotated[int, Form(ge=0, le=MAX_BOX_COORD)],
        right: Annotated[int, Form(ge=1, le=MAX_BOX_COORD)],
        bottom: Annotated[int, Form(ge=1, le=MAX_BOX_COORD)],
        num: Annotated[int, Form(ge=1)] = 8,
        keep: Annotated[int | None, Form(ge=1)] = None,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
    ) -> JSONResponse:
        """Start regenerating the box (left, top, right, bottom) of an uploaded image from a prompt."""
        check_num(num, keep)
        name = file.filename or "the upload"
        image = decode_upload(file.file.read(state.max_upload_bytes + 1), name, state.max_upload_bytes)
        if not (left < right <= image.width and top < bottom <= image.height):
            raise HTTPException(
                status_code=422,
                detail=f"box ({left}, {top}, {right}, {bottom}) must lie inside the "
                f"{image.width}x{image.height} image with left < right and top < bottom",
            )
        image, box = generator.prepare_edit(image, (left, top, right, bottom))

        def work(progress):
            return generator.edit(image, box, prompt, num=num, keep=keep, seed=seed, progress=progress)

        return _accepted(state.jobs.submit("edit", prompt, work))

    @router.get("/jobs/{job_id}", response_model=JobResponse, responses=LOOKUP_ERRORS)
    def job(job_id: JobId) -> JobResponse:
        """Progress of a generation job and, once done, its images (best first) with CLIP scores."""
        found = state.jobs.get(job_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id} (finished jobs are kept a while)")
        return job_response(found)

    @router.get(
        "/jobs/{job_id}/images/{n}",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **LOOKUP_ERRORS},
    )
    def job_image(job_id: JobId, n: Annotated[int, Path(ge=0, le=10_000)]) -> Response:
        """The n-th image of a finished job, as PNG."""
        found = state.jobs.get(job_id)
        if found is None or found.status != "done" or found.output is None:
            raise HTTPException(status_code=404, detail=f"job {job_id} has no images (yet)")
        if n >= len(found.output.images):
            raise HTTPException(
                status_code=404, detail=f"job {job_id} has {len(found.output.images)} images, not {n + 1}"
            )
        return Response(encode_png(found.output.images[n]), media_type="image/png")

    return router
