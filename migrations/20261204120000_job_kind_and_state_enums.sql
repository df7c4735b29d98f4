-- A job's kind and state become Postgres enums, mapped to Rust's `JobKind`
-- and `JobState` (db::jobs): a misspelt kind or state in a statement fails
-- when it is prepared instead of matching nothing. The trigger and the
-- partial indexes that name the state column are rebuilt around the change.

drop trigger jobs_notify_update on jobs;
drop index jobs_queued_idx;
drop index jobs_running_lease_idx;

alter table jobs drop constraint jobs_kind_check;
alter table jobs drop constraint jobs_state_check;
alter table jobs alter column state drop default;

create type job_kind as enum ('pretrain', 'finetune', 'evaluate');
create type job_state as enum ('queued', 'running', 'succeeded', 'failed', 'cancelled');

alter table jobs
    alter column kind type job_kind using kind::job_kind,
    alter column state type job_state using state::job_state;
alter table jobs alter column state set default 'queued';

create index jobs_queued_idx on jobs (created_at) where state = 'queued';
create index jobs_running_lease_idx on jobs (lease_expires_at) where state = 'running';

create trigger jobs_notify_update
    after update on jobs
    for each row
    when (old.state is distinct from new.state
          or old.progress is distinct from new.progress
          or old.latest_metrics is distinct from new.latest_metrics
          or old.error is distinct from new.error
          or old.model_id is distinct from new.model_id)
    execute function notify_job_changed();
