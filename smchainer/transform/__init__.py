"""Batch transform: every record of a file, folder or S3 prefix through a server, as SageMaker's.

``smchainer-transform`` (:mod:`~smchainer.transform.cli`) and the notebook
API's :class:`~smchainer.api.transformer.Transformer` both run a
:class:`~smchainer.transform.job.TransformJob`:

:mod:`~smchainer.transform.locations`
    the inputs (local or S3) and where each ``<name>.out`` goes;
:mod:`~smchainer.transform.records`
    SplitType, BatchStrategy, MaxPayloadInMB and AssembleWith: files to
    request bodies and answers back to ``.out`` files;
:mod:`~smchainer.transform.client`
    ``POST /invocations`` with timeouts and retries;
:mod:`~smchainer.transform.job`
    the job: the server it starts (or uses), requests in flight, record
    order, failures and the ``_failures.json`` report;
:mod:`~smchainer.transform.progress`
    progress lines, and a bar on a terminal.

``docs/BATCH_TRANSFORM.md`` is the user's page. Nothing here imports Chainer.
"""
