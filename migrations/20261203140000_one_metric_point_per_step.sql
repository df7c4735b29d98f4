-- One metric point per job, step and name. A job resumed from its checkpoint
-- trains again the steps between the checkpoint and the interruption, and
-- reports them again: their points are already recorded, and the first one
-- recorded is the one kept (the live event stream has sent it already).
delete from job_metrics newer
using job_metrics older
where newer.job_id = older.job_id
  and newer.step = older.step
  and newer.name = older.name
  and newer.id > older.id;

create unique index job_metrics_job_step_name_idx on job_metrics (job_id, step, name);

-- The unique index serves every query the (job_id, step) index served.
drop index job_metrics_job_idx;
