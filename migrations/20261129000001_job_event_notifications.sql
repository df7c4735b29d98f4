-- Job event streams wake on a notification carrying the job's id whenever
-- what they show changes: the job's state, progress or latest metrics, a new
-- metric row, or the job's removal. Lease renewals notify nobody.

create function notify_job_changed() returns trigger
language plpgsql as $$
begin
    if tg_op = 'DELETE' then
        perform pg_notify('pretext_job_events', old.id::text);
    else
        perform pg_notify('pretext_job_events', new.id::text);
    end if;
    return null;
end
$$;

create function notify_job_metric_added() returns trigger
language plpgsql as $$
begin
    perform pg_notify('pretext_job_events', new.job_id::text);
    return null;
end
$$;

create trigger jobs_notify_update
    after update on jobs
    for each row
    when (old.state is distinct from new.state
          or old.progress is distinct from new.progress
          or old.latest_metrics is distinct from new.latest_metrics
          or old.error is distinct from new.error
          or old.model_id is distinct from new.model_id)
    execute function notify_job_changed();

create trigger jobs_notify_delete
    after delete on jobs
    for each row
    execute function notify_job_changed();

create trigger job_metrics_notify_insert
    after insert on job_metrics
    for each row
    execute function notify_job_metric_added();
