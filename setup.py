"""ingredients: a JAX/TPU-first research codebase for large language models."""

import setuptools

setuptools.setup(
    name="ingredients",
    version="0.1.0",
    description="Pre-training, alignment and fast inference of decoder-only LLMs in one JAX stack.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["model*", "rundir*", "train*", "align*", "infer*", "pallas_kernels*", "configs*"]
    ),
    install_requires=[
        # CPU wheels of 0.10.x come from the registry; GPU machines run 0.11.x.
        "jax>=0.10,<0.12",
        "flax>=0.12.8,<0.14",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        # Reads and writes Hugging Face weights without torch; tensor-by-tensor access.
        "safetensors>=0.6",
        "numpy>=1.26",
        "absl-py>=1.0",  # flags for the entry points (ml_collections' config flags are absl flags)
        # TensorBoard event files without TensorFlow: the light, well-kept writer.
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "fastapi>=0.110",  # the OpenAI-compatible HTTP server (infer/serve): routes, JSON bodies, SSE streams
        "uvicorn>=0.29",  # the ASGI server that runs it
        "prometheus_client>=0.20",  # /metrics in Prometheus' text format, counters and histograms
        "jinja2>=3.1",  # renders a Hugging Face directory's chat_template, as transformers does
        # Training curves (train.plot), the scaling-law figures (train.scaling) and test-time compute
        # curves: the standard plotting library; imported only when a figure is drawn (headless Agg).
        # 3.7: legends placed outside the axes ("outside upper center").
        "matplotlib>=3.7",
    ],
    extras_require={
        # pytest-xdist: JAX compilation (single-threaded) dominates the suite, so one worker per
        # core runs it nearly twice as fast on a 2-core machine.
        # openai, httpx: the server is tested through OpenAI's own client, and raw requests for the
        # bodies that client will not send; portpicker: a free port for each live test server.
        # libtpu: the Pallas TPU kernels are compiled ahead of time for real TPU topologies on this
        # CPU (0.0.52 is the one measured to work beside jax 0.10.2; jax[tpu] pins an older one).
        # nbclient, nbformat, ipykernel: tests/test_notebooks.py executes examples/*.ipynb in a real
        # kernel (the notebook runner nbmake uses, without its pytest plugin: we set each kernel's
        # environment and check what each notebook writes).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "openai>=1.30", "httpx>=0.27", "portpicker>=1.6",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29",
                 "libtpu==0.0.52; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        "tpu": ["libtpu==0.0.52"],
    },
)
