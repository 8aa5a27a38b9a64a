# %% [markdown]
# # CIFAR-10 with VGG: the SageMaker Chainer notebook, on this machine
#
# The flow of the SageMaker example notebook "Training and hosting a Chainer
# model on CIFAR-10", its cells in order: import Chainer, make the data,
# upload it, train the VGG script with `Chainer(...).fit(...)`, look at the
# plots, deploy, predict, `chainer_estimator.delete_endpoint()`. Only the
# imports changed (`smchainer.api` instead of `sagemaker`), and
# `instance_type` is `local` (CPU) or `local_gpu`. `import chainer` comes
# first, as in the notebook: in an environment with smchainer it works in any
# interpreter (see the README's "import chainer" section).
#
# It is sized to run on a CPU in a few minutes: a subset of CIFAR-10 and a
# narrow VGG. Run it as a script (`.venv/bin/python examples/cifar10_notebook.py`)
# or cell by cell (`# %%`) in VS Code or Jupyter (jupytext). Settings:
#
# | variable | default | |
# |---|---|---|
# | `SMCHAINER_SHARED` | `../shared` beside the project | holds `data/cifar10/{train,test}.zip` |
# | `SMCHAINER_EXAMPLE_WORK` | a new temporary folder | data, jobs |
# | `SMCHAINER_EXAMPLE_TRAIN_PER_CLASS` | 200 | training images per class |
# | `SMCHAINER_EXAMPLE_TEST_PER_CLASS` | 50 | test images per class |
# | `SMCHAINER_EXAMPLE_EPOCHS` | 4 | |
# | `SMCHAINER_EXAMPLE_INSTANCES` | 1 | 2 or more: data-parallel with ChainerMN under MPI |
# | `SMCHAINER_EXAMPLE_INSTANCE_TYPE` | `local` | `local_gpu` for the GPUs |
# | `SMCHAINER_DEFAULT_BUCKET`, `AWS_ENDPOINT_URL` | unset | upload to this S3 bucket |

# %%
import chainer

print("chainer", chainer.__version__)

# %%
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

# In the SageMaker notebook:
#   import sagemaker
#   from sagemaker.chainer.estimator import Chainer
from smchainer.api import Chainer, Session, get_execution_role

try:
    HERE = Path(__file__).resolve().parent
except NameError:  # a notebook kernel started in examples/
    HERE = Path.cwd()
SHARED = Path(os.environ.get("SMCHAINER_SHARED", HERE.parent.parent / "shared"))
CIFAR10 = SHARED / "data" / "cifar10"
WORK = Path(os.environ.get("SMCHAINER_EXAMPLE_WORK") or tempfile.mkdtemp(prefix="cifar10-"))
TRAIN_PER_CLASS = int(os.environ.get("SMCHAINER_EXAMPLE_TRAIN_PER_CLASS", 200))
TEST_PER_CLASS = int(os.environ.get("SMCHAINER_EXAMPLE_TEST_PER_CLASS", 50))
EPOCHS = int(os.environ.get("SMCHAINER_EXAMPLE_EPOCHS", 8))
INSTANCES = int(os.environ.get("SMCHAINER_EXAMPLE_INSTANCES", 1))
INSTANCE_TYPE = os.environ.get("SMCHAINER_EXAMPLE_INSTANCE_TYPE", "local")

sagemaker_session = Session()
role = get_execution_role()
print("work folder:", WORK)

# %% [markdown]
# ## The data
#
# The SageMaker notebook takes CIFAR-10 from `chainer.datasets.get_cifar10()`
# and saves it as `train.npz` / `test.npz` with keys `data` (float32,
# N x 3 x 32 x 32 in [0, 1]) and `labels`. Here it comes from the shared
# JPEG class folders; a balanced subset keeps the run short.

# %%
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def read_cifar10(archive, split, per_class):
    """The first `per_class` images of every class, as float32 CHW in [0, 1], and labels."""
    from PIL import Image

    images, labels = [], []
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(n for n in zipped.namelist() if n.endswith(".jpg"))
        for label, name in enumerate(CLASSES):
            for member in [n for n in names if n.startswith(f"{split}/{name}/")][:per_class]:
                with Image.open(io.BytesIO(zipped.read(member))) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.float32) / 255)
                labels.append(label)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.asarray(labels, dtype=np.int32)


train_data, train_labels = read_cifar10(CIFAR10 / "train.zip", "train", TRAIN_PER_CLASS)
test_data, test_labels = read_cifar10(CIFAR10 / "test.zip", "test", TEST_PER_CLASS)
for split, data, labels in (("train", train_data, train_labels),
                            ("test", test_data, test_labels)):
    (WORK / "data" / split).mkdir(parents=True, exist_ok=True)
    np.savez(WORK / "data" / split / f"{split}.npz", data=data, labels=labels)
print("train", train_data.shape, "test", test_data.shape)

# %% [markdown]
# ## Upload the data
#
# With a bucket (`SMCHAINER_DEFAULT_BUCKET`, any S3-compatible store through
# `AWS_ENDPOINT_URL`) this uploads to S3 and the job downloads it; without one
# the local folders are used as they are.

# %%
train_input = sagemaker_session.upload_data(path=str(WORK / "data" / "train"),
                                            key_prefix="notebook/chainer_cifar/train")
test_input = sagemaker_session.upload_data(path=str(WORK / "data" / "test"),
                                           key_prefix="notebook/chainer_cifar/test")
print("train:", train_input)
print("test: ", test_input)

# %% [markdown]
# ## Train
#
# `cifar10/train.py` is a SageMaker-style script: its hyperparameters arrive
# as arguments, its data and folders as `SM_*` variables. With more than one
# instance it trains data-parallel with ChainerMN (one MPI process each).

# %%
chainer_estimator = Chainer(
    entry_point="train.py",
    source_dir=str(HERE / "cifar10"),
    role=role,
    sagemaker_session=sagemaker_session,
    train_instance_count=INSTANCES,
    train_instance_type=INSTANCE_TYPE,
    hyperparameters={"epochs": EPOCHS, "batch-size": 32, "learning-rate": 0.05,
                     "width": 0.25, "depth": 8},
    jobs_dir=str(WORK / "jobs"),
)
chainer_estimator.fit({"train": train_input, "test": test_input})
print("model:", chainer_estimator.model_data)

# %% [markdown]
# ## The training plots
#
# The script's PlotReport wrote `loss.png` and `accuracy.png` to
# `SM_OUTPUT_DATA_DIR`; they come back in `output.tar.gz`.

# %%
artifacts = sagemaker_session.extract_artifact(chainer_estimator.output_data,
                                               WORK / "artifacts")
for plot in ("loss.png", "accuracy.png"):
    path = artifacts / plot
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"{path} is not a PNG image")
    try:
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    except ImportError:
        print("plot:", path)

# %% [markdown]
# ## Deploy and predict
#
# `deploy` starts `smchainer-serve` on a free loopback port with the script's
# `model_fn`; the predictor sends `application/x-npy` and gets NumPy back.

# %%
predictor = chainer_estimator.deploy(initial_instance_count=1, instance_type=INSTANCE_TYPE)

# %%
correct = 0
for start in range(0, len(test_data), 100):
    logits = predictor.predict(test_data[start:start + 100])
    correct += int((logits.argmax(axis=1) == test_labels[start:start + 100]).sum())
accuracy = correct / len(test_data)
print(f"test accuracy: {accuracy:.3f} on {len(test_data)} images (chance: 0.100)")
picks = np.arange(0, len(test_data), TEST_PER_CLASS)  # one image of each class
sample = predictor.predict(test_data[picks]).argmax(axis=1)
print("predicted:", [CLASSES[i] for i in sample])
print("actual:   ", [CLASSES[i] for i in test_labels[picks]])

# %% [markdown]
# ## Delete the endpoint
#
# The notebook's last cell: the server and its workers stop. (An endpoint
# still running when Python exits is stopped too.)

# %%
chainer_estimator.delete_endpoint()
print("endpoint deleted")
