"""Session: upload_data and artifacts on S3 (a real loopback server) or on local disk."""
from __future__ import annotations

import tarfile
import textwrap

import numpy as np
import pytest

from smchainer.api import Chainer, Model, Session
from smchainer.storage import s3_client

#: reads its S3 channel and resumes from its checkpoint; serves "x times the factor"
SCRIPT = """\
import os

import numpy as np


def model_fn(model_dir):
    factor = float(open(os.path.join(model_dir, "factor.txt")).read())
    return lambda x: x * factor


if __name__ == "__main__":
    values = np.load(os.path.join(os.environ["SM_CHANNEL_TRAIN"], "values.npy"))
    checkpoints = os.environ["SMCHAINER_CHECKPOINT_DIR"]
    resumed = open(os.path.join(checkpoints, "step.txt")).read()
    with open(os.path.join(checkpoints, "step.txt"), "w") as f:
        f.write(str(int(resumed) + 1))
    with open(os.path.join(os.environ["SM_MODEL_DIR"], "factor.txt"), "w") as f:
        f.write(str(values.sum()))
    with open(os.path.join(os.environ["SM_OUTPUT_DATA_DIR"], "resumed.txt"), "w") as f:
        f.write(resumed)
"""


def objects(bucket: str, prefix: str = "") -> list[str]:
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listing.get("Contents", []))


def test_without_a_bucket_data_stays_local(tmp_path, monkeypatch):
    monkeypatch.delenv("SMCHAINER_DEFAULT_BUCKET", raising=False)
    (tmp_path / "train").mkdir()
    session = Session()
    assert session.default_bucket() is None
    assert session.upload_data(str(tmp_path / "train")) == str(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        session.upload_data(str(tmp_path / "missing"))


@pytest.mark.s3
def test_upload_data_puts_folders_and_files_on_s3(s3_bucket, tmp_path):
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "train.npz").write_bytes(b"npz")
    (tmp_path / "data" / "sub" / "more.txt").write_text("more")
    session = Session(default_bucket=s3_bucket)
    assert session.default_bucket() == s3_bucket
    uri = session.upload_data(str(tmp_path / "data"), key_prefix="notebook/train")
    assert uri == f"s3://{s3_bucket}/notebook/train"
    assert objects(s3_bucket) == ["notebook/train/sub/more.txt", "notebook/train/train.npz"]
    file_uri = session.upload_data(str(tmp_path / "data" / "train.npz"), key_prefix="one")
    assert file_uri == f"s3://{s3_bucket}/one/train.npz"
    back = session.download_data(tmp_path / "back", s3_bucket, "notebook/train")
    assert (back / "sub" / "more.txt").read_text() == "more"


@pytest.mark.s3
def test_s3_channels_output_and_checkpoints_then_serve_from_s3(s3_bucket, tmp_path):
    session = Session(default_bucket=s3_bucket)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "values.npy", np.array([1.0, 2.0, 0.5]))
    train = session.upload_data(str(tmp_path / "data"), key_prefix="values")
    (tmp_path / "previous").mkdir()
    (tmp_path / "previous" / "step.txt").write_text("41")
    session.upload_data(str(tmp_path / "previous"), key_prefix="checkpoints")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(textwrap.dedent(SCRIPT))

    estimator = Chainer(entry_point="train.py", source_dir=str(tmp_path / "src"),
                        sagemaker_session=session, jobs_dir=tmp_path / "jobs",
                        output_path=f"s3://{s3_bucket}/results",
                        checkpoint_s3_uri=f"s3://{s3_bucket}/checkpoints")
    estimator.fit({"train": train}, logs=False)
    job = estimator.latest_training_job
    prefix = f"s3://{s3_bucket}/results/{job.name}/output"
    assert estimator.model_data == f"{prefix}/model.tar.gz"
    assert estimator.output_data == f"{prefix}/output.tar.gz"
    artifacts = session.extract_artifact(estimator.output_data, tmp_path / "artifacts")
    assert (artifacts / "resumed.txt").read_text() == "41"  # the S3 checkpoint came down
    checkpoint = tmp_path / "checkpoint-after"
    session.download_data(checkpoint, s3_bucket, "checkpoints/step.txt")
    assert (checkpoint / "step.txt").read_text() == "42"  # and the new one went up

    model = Model(estimator.model_data, entry_point=str(job.job_dir / "code" / "train.py"),
                  sagemaker_session=session)
    with model.deploy(initial_instance_count=1, instance_type="local") as predictor:
        answer = predictor.predict(np.array([[1.0, 2.0]], dtype=np.float32))
    np.testing.assert_allclose(answer, [[3.5, 7.0]])


def test_extract_artifact_refuses_unsafe_archives(tmp_path):
    outside = tmp_path / "evil.txt"
    outside.write_text("x")
    archive = tmp_path / "output.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(outside, arcname="../evil.txt")
    with pytest.raises(Exception, match="outside the target"):
        Session().extract_artifact(archive, tmp_path / "into")
