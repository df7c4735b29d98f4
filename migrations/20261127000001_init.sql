-- Datasets, jobs (the queue), models and training metrics.

create table datasets (
    id uuid primary key,
    name text not null,
    num_images integer not null,
    labeled boolean not null,
    channels integer not null check (channels in (1, 3)),
    classes jsonb not null,
    class_counts jsonb not null,
    skipped jsonb not null,
    skipped_count integer not null,
    bytes bigint not null,
    median_side integer not null,
    created_at timestamptz not null default now()
);

create table models (
    id uuid primary key,
    kind text not null check (kind in ('encoder', 'classifier')),
    backbone text not null,
    pretext text,
    job_id uuid not null,
    base_model_id uuid references models (id) on delete set null,
    dataset_id uuid references datasets (id) on delete set null,
    classes jsonb not null,
    embedding_dim integer not null,
    input jsonb not null,
    metrics jsonb not null,
    pretext_config jsonb,
    created_at timestamptz not null default now()
);

create table jobs (
    id uuid primary key,
    kind text not null check (kind in ('pretrain', 'finetune')),
    state text not null default 'queued'
        check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    dataset_id uuid references datasets (id) on delete set null,
    base_model_id uuid references models (id) on delete set null,
    config jsonb not null,
    progress jsonb not null,
    latest_metrics jsonb not null default '{}',
    model_id uuid references models (id) on delete set null,
    error text,
    attempts integer not null default 0,
    max_attempts integer not null,
    cancel_requested boolean not null default false,
    device text,
    lease_owner uuid,
    lease_expires_at timestamptz,
    created_at timestamptz not null default now(),
    started_at timestamptz,
    finished_at timestamptz
);

create index jobs_queued_idx on jobs (created_at) where state = 'queued';
create index jobs_running_lease_idx on jobs (lease_expires_at) where state = 'running';
create index jobs_dataset_idx on jobs (dataset_id);
create index jobs_base_model_idx on jobs (base_model_id);

create table job_metrics (
    id bigserial primary key,
    job_id uuid not null references jobs (id) on delete cascade,
    step bigint not null,
    epoch integer not null,
    name text not null,
    value double precision not null,
    at timestamptz not null default now()
);

create index job_metrics_job_idx on job_metrics (job_id, step);
