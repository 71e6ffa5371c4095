"""Configuration: pydantic models with descriptions; the one place that holds defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.common.types import Variant

MiB = 1024 * 1024
# Chat requests one router replica serves at once unless `router.deployment.max_ongoing_requests` says.
DEFAULT_MAX_ONGOING_CHATS = 256
# Serve's cap on a router replica is the router's own plus this: room for its 503s and the cheap routes.
ROUTER_HEADROOM = 32


class ModelSettings(BaseModel):
    """What one model deployment loads and how it generates (the `model:` block of a variant)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(
        default="preset:tiny",
        description="A local checkpoint directory, a hub id (needs network), or 'preset:<tiny|small|full-size>' "
        "for a built-in random-weight checkpoint (random text; built on first use into the preset cache).",
    )
    served_name: str | None = Field(
        default=None,
        description="The name clients use in `model`. Default: MiniCPM-V-4.6 / MiniCPM-V-4.6-Thinking.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype. auto: bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16 / AMX), "
        "else float32. bfloat16 on other CPUs: one row reads bf16 weights (faster), several an fp32 copy."
    )
    device: str = Field(default="auto", description="torch device: auto (cuda if present, else cpu), cpu, cuda, cuda:1...")
    max_model_len: int | None = Field(
        default=None, gt=0,
        description="Prompt + max_tokens limit. Default: the checkpoint's max_position_embeddings.",
    )
    decode_path: Literal["engine", "transformers"] = Field(
        default="engine",
        description="What runs a decode step. engine: the engine's own text tower (deployments/engine/tower.py: fused "
        "projections, linear-attention states updated in place, grouped-head attention over the slot cache; the same "
        "checkpoint tensors, logits equal to transformers' within rounding). transformers: the checkpoint's "
        "transformers modules (the reference). Prompts are prefilled by transformers' modules either way.",
    )
    compile_decode: bool = Field(
        default=True,
        description="Compile the decode step with torch.compile (inductor; needs a C++ compiler on CPU; on a CPU the "
        "engine's tower is compiled with its weights frozen, which lets inductor prepack them for oneDNN's bf16 "
        "kernels). A background thread builds the graphs when the replica starts while requests decode eagerly, "
        "logging when it is done; then every step runs compiled. Cold, about a minute on 2 CPU cores for the small "
        "preset; the compiler's cache (MINICPM_COMPILE_CACHE) makes later starts faster. If compiling fails, "
        "decoding stays eager. false: eager steps only.",
    )
    compile_resumed_prefill: bool = Field(
        default=False,
        description="Compile the forward of a prompt that resumes from the prefix cache with 2 to 63 new tokens (a "
        "chat's later turn, most often) with torch.compile (inductor; needs a C++ compiler on CPU). Two graphs "
        "(suffixes of up to 31 and of 33-63 tokens) serve every prefix length; a background thread builds them when "
        "the replica starts (about 1.5 min on 2 CPU cores for the small preset, after the decode step's graphs when "
        "both are on; a compiler cache makes later starts faster) while such prompts run eagerly. Other suffixes, "
        "prompts that resume from nothing and batched prefills stay eager. Measured on a later turn of the small "
        "preset (BENCHMARKS.md). If compiling fails, they stay eager.",
    )
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads for CPU inference. Default: torch's choice."
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=256,
        description="Requests generated together in one batched generate. 1: one request at a time.",
    )
    continuous_batching: bool = Field(
        default=True,
        description="New requests join the running batch at the next decode step. false: they wait until every "
        "request of the running batch has finished (simpler; lower throughput under load).",
    )
    max_generation_s: float | None = Field(
        default=600.0, gt=0,
        description="Longest a request may take, waiting included; then it ends with finish_reason 'length'.",
    )
    prefix_cache_bytes: int = Field(
        default=1024 * MiB, ge=0,
        description="Memory (on the model's device) for the prefix cache: the text tower's state at the end of "
        "each chat's last user turn, so that its next turn prefills only what is new. 0: off. An entry costs the "
        "full-attention keys/values of its prefix plus a fixed linear-attention state (about 19 MiB at the real "
        "model's size, 0.45 MiB for the small preset).",
    )
    prefix_cache_min_tokens: int = Field(
        default=256, ge=1,
        description="A prompt is stored in the prefix cache when its last user turn ends this many tokens or more "
        "past where it resumed from (the start, or a snapshot), or when that part holds an image or video (with "
        "prefix_cache_answers false, also every prompt that resumed). Storing costs memory and a second pass of "
        "the linear-attention layers' recurrence in that prefill: a short one-shot text prompt is not worth it.",
    )
    prefix_cache_answers: bool = Field(
        default=True,
        description="After a turn of a chat the prefix cache holds, prefill its answer as the next turn will resend "
        "it, once the replica has nothing else to run, and store the state after the opening of the next user turn "
        "(`<|im_start|>user\\n`, or the end of the assistant turn where the template opens it otherwise): the "
        "next turn then prefills only its own new text. false: every later turn is stored at the end of its user "
        "turn instead, inside its own prefill (the next turn then prefills the answer).",
    )
    vision_cache_bytes: int = Field(
        default=256 * MiB, ge=0,
        description="Memory (on the model's device) for the vision-feature cache: the vision tower's output per "
        "image or video, keyed by its pixels and options, so that a resent image skips the tower. 0: off.",
    )
    processor_cache_bytes: int = Field(
        default=128 * MiB, ge=0,
        description="Memory (host) for the image and video processors' output per item (resized, sliced, "
        "normalised pixels), keyed by its pixels and the options, so that an image or a video a chat resends "
        "every turn is processed once. 0: off.",
    )
    media_store_bytes: int = Field(
        default=256 * MiB, ge=0,
        description="Memory (host) for the images and videos this replica received, by the digest of their pixels: "
        "a router then sends a chat's later turns the digest of an image or video it handed over before instead "
        "of its pixels (a copy of 3.7 MB for a 1280x960 photo), and resends the pixels when this replica lacks "
        "them. 0: off (every request carries its pixels).",
    )
    prefill_chunk_tokens: int = Field(
        default=512, ge=16,
        description="Most prompt tokens one prefill forward computes. Short prompts that arrive together are "
        "prefilled together up to this many (padded) tokens; a longer prompt is prefilled in chunks of this size, "
        "and the running requests decode one step between chunks, so a long prompt never stalls them for long.",
    )
    stream_interval_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="Least time between two chunks of one stream; tokens generated meanwhile go out together "
        "in the next chunk. 0: every token as soon as it is ready. Each chunk costs CPU in the router and the "
        "proxy (a few ms on a small CPU), so a fast model serving many streams gains throughput from 20-50.",
    )
    health_check_stall_s: float = Field(
        default=120.0, gt=0, description="A running batch with no decode step for this long fails health checks.",
    )
    batch_wait_ms: float = Field(
        default=5.0, ge=0, le=1000,
        description="How long an idle replica waits for more requests to fill a batch before starting (not for a "
        "request that resumes from the prefix cache: that one is prefilled alone).",
    )



class ModelConfig(ModelSettings):
    """ModelSettings of one deployment, bound to the variant it serves."""

    variant: Variant = Field(description="Which variant this deployment serves: 'instruct' or 'thinking'.")

    @property
    def name(self) -> str:
        return self.served_name or ("MiniCPM-V-4.6-Thinking" if self.variant == "thinking" else "MiniCPM-V-4.6")


class DeploymentOptions(BaseModel):
    """Ray Serve options of one deployment (see Ray Serve's deployment config reference)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(
        default=None, ge=1, description="Fixed replica count. Leave unset to use autoscaling_config."
    )
    autoscaling_config: dict | None = Field(
        default=None,
        description="Ray Serve autoscaling: min_replicas, max_replicas, target_ongoing_requests, "
        "upscale_delay_s, downscale_delay_s, ...",
    )
    ray_actor_options: dict = Field(
        default_factory=dict, description="Resources per replica, e.g. {num_cpus: 1, num_gpus: 1}."
    )
    max_ongoing_requests: int | None = Field(
        default=None, ge=1,
        description="Requests one replica accepts at once. Model deployments default to 2 x max_batch_size "
        "(a full batch generating, as many waiting for a free row). The router: chat requests at once "
        "(default 256), past which it answers 503 itself; Serve's cap on it is 32 above, for the cheap routes.",
    )
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Requests waiting for a replica before new ones get 503 (-1: unbounded; "
        "0 is not allowed by Ray Serve).",
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="How long in-flight streams may finish when a replica stops."
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_size(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (unbounded) or at least 1; Ray Serve has no zero-length queue")
        return value

    def serve_options(self) -> dict:
        """Keyword arguments for `Deployment.options`."""
        options = self.model_dump(exclude_none=True)
        if self.num_replicas is None and self.autoscaling_config is None:
            options["num_replicas"] = 1
        return options


class VariantArgs(BaseModel):
    """One model deployment: what it loads and how Ray Serve runs it."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    chat_affinity: bool = Field(
        default=True,
        description="With more than one replica: send the turns of one chat to the same replica (the one holding "
        "its prefix and vision caches) unless that replica has a full batch running; false: Ray Serve's default "
        "power of two choices.",
    )

    def serve_options(self) -> dict:
        """Deployment options with queue sizes derived from the batch size where not set.

        A replica takes 2 batches of requests (a full batch generating, as many waiting for a free
        row), and the autoscaler aims at one full batch per replica, so replicas are added only when
        batches are full.
        """
        options = self.deployment.serve_options()
        batch = self.model.max_batch_size
        options.setdefault("max_ongoing_requests", 2 * batch)
        if "autoscaling_config" in options:
            options["autoscaling_config"] = {"target_ongoing_requests": batch, **options["autoscaling_config"]}
        if self.chat_affinity and self.max_replicas > 1:  # with one replica there is nothing to choose
            options["request_router_config"] = {
                "request_router_class": "deployments.replica.affinity:ChatAffinityRouter",
                "request_router_kwargs": {"busy_requests": batch}}
        return options

    @property
    def max_replicas(self) -> int:
        """The most replicas this deployment can have (autoscaling's max_replicas, else num_replicas, else 1)."""
        autoscaling = self.deployment.autoscaling_config
        if autoscaling is not None:
            return int(autoscaling.get("max_replicas", 1))
        return self.deployment.num_replicas or 1


class MediaConfig(BaseModel):
    """How the router accepts images and videos. Remote URLs and local paths are off by default."""

    model_config = ConfigDict(extra="forbid")

    max_images_per_request: int = Field(default=8, ge=0, description="Images in one request, all messages.")
    max_videos_per_request: int = Field(default=2, ge=0, description="Videos in one request, all messages.")
    max_image_bytes: int = Field(default=20 * MiB, gt=0, description="Encoded size of one image.")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="width x height of one image, checked before decoding (bombs)."
    )
    max_image_decoded_bytes: int = Field(
        default=256 * MiB, gt=0,
        description="Decoded RGB bytes (width x height x 3) of all images of one request, checked before each is "
        "decoded: a few small files of huge flat images cannot fill the router's memory.")
    max_image_aspect_ratio: float = Field(
        default=50.0, ge=1.0,
        description="Longest side over shortest side of one image: a 1,800,000 x 9 strip would become thousands of "
        "vision tokens encoded in one piece.")
    max_video_bytes: int = Field(default=100 * MiB, gt=0, description="Encoded size of one video.")
    max_video_duration_s: float = Field(default=600.0, gt=0, description="Length of one video.")
    max_video_frame_pixels: int = Field(
        default=1920 * 1080, gt=0, description="width x height of a decoded video frame; larger videos are decoded "
        "downscaled to fit (the processor resizes frames to far fewer pixels anyway).",
    )
    max_video_decoded_bytes: int = Field(
        default=128 * MiB, gt=0, description="Bytes of decoded RGB frames of all videos in one request (shared "
        "equally between them); frames that would not fit are decoded downscaled to fit.",
    )
    video_fps: float = Field(default=2.0, gt=0, description="Frames sampled per second of video by default.")
    video_fps_cap: float = Field(default=8.0, gt=0, description="Highest fps a request may ask for.")
    max_video_frames: int = Field(
        default=32, ge=1, description="Most frames sampled from one video (requests may ask for fewer)."
    )
    local_media_dir: str | None = Field(
        default=None, description="Directory whose files requests may name by path or file:// URL. None: off."
    )
    allow_remote: bool = Field(default=False, description="Fetch http(s) URLs. Off: such URLs get a 400.")
    allowed_domains: list[str] = Field(
        default_factory=list, description="If set, only these domains (and their subdomains) are fetched."
    )
    allow_private_addresses: bool = Field(
        default=False, description="Fetch from loopback, private, link-local and metadata addresses (unsafe)."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=20.0, gt=0)
    fetch_timeout_s: float = Field(default=60.0, gt=0, description="Whole download, redirects included.")
    max_redirects: int = Field(default=3, ge=0)
    decoded_cache_bytes: int = Field(
        default=64 * MiB, ge=0,
        description="Memory for recently decoded data-URL images and videos, keyed by a hash of the URL (its "
        "content) and the decoding options: a chat resends its images every turn, and each is decoded once "
        "within decoded_cache_ttl_s. 0: off. http(s) URLs and paths are always read again.",
    )
    decoded_cache_ttl_s: float = Field(default=300.0, gt=0, description="How long a decoded item is reused.")
    max_concurrent_decodes: int = Field(default=4, ge=1, description="Decodes running at once in one router.")


class RouterArgs(BaseModel):
    """The ingress deployment: HTTP, validation and routing."""

    model_config = ConfigDict(extra="forbid")

    default_max_tokens: int = Field(default=1024, ge=1, description="max_tokens when a request sends none.")
    media: MediaConfig = Field(default_factory=MediaConfig)
    max_tokens_cap: int = Field(default=8192, ge=1, description="Largest max_tokens a request may ask for.")
    max_messages: int = Field(default=256, ge=1, description="Most messages in one request.")
    max_content_parts: int = Field(default=64, ge=1, description="Most content parts (text, image, video) in one message.")
    max_text_chars: int = Field(
        default=500_000, ge=1, description="Most characters of text in one request, all messages; checked before "
        "tokenizing (the context limit is checked after).",
    )
    max_body_bytes: int = Field(
        default=160 * MiB, gt=0, description="Largest request body (data URLs included); larger gets 413.",
    )
    api_key: str | None = Field(
        default=None, description="Require 'Authorization: Bearer <key>' on /v1/*. Prefer api_key_env.",
    )
    api_key_env: str | None = Field(
        default=None, description="Name of an environment variable holding the API key (wins over api_key).",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser. Empty: CORS off.",
    )
    deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(max_queued_requests=512))

    @property
    def max_ongoing_chats(self) -> int:
        """Chat requests one router replica serves at once; past it the router answers 503 with Retry-After.
        The router holds many mostly idle streams, so it takes 256 by default."""
        return self.deployment.max_ongoing_requests or DEFAULT_MAX_ONGOING_CHATS

    def serve_options(self) -> dict:
        """Deployment options. Serve's cap is the router's own plus headroom: the router's 503s (and the
        health check, the page, /v1/models) need a slot too, and Serve's backpressure 503 is plain text
        without Retry-After."""
        options = self.deployment.serve_options()
        options["max_ongoing_requests"] = self.max_ongoing_chats + ROUTER_HEADROOM
        return options


class AppArgs(BaseModel):
    """The `args:` of the application in serve_config.yaml. Leave a variant out to run without it."""

    model_config = ConfigDict(extra="forbid")

    instruct: VariantArgs | None = Field(default_factory=VariantArgs, description="The instruct model deployment.")
    thinking: VariantArgs | None = Field(default_factory=VariantArgs, description="The thinking model deployment.")
    router: RouterArgs = Field(default_factory=RouterArgs)

    def model_configs(self) -> dict[str, ModelConfig]:
        """ModelConfig of each loaded variant, keyed by variant; raises ValueError if none is."""
        configs = {
            variant: ModelConfig(variant=variant, **args.model.model_dump())
            for variant, args in (("instruct", self.instruct), ("thinking", self.thinking))
            if args is not None
        }
        if not configs:
            raise ValueError("At least one of 'instruct' and 'thinking' must be configured")
        return configs

