-- Jobs that run a stored model over every image of a dataset and leave files
-- behind (embeddings, predictions) instead of a model. Their summary goes in
-- `jobs.report`, like an evaluation's.
alter type job_kind add value 'embed';
alter type job_kind add value 'predict';
