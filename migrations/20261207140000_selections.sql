-- Which images to label next: each selection is kept with how it was made
-- (the model, the embed job whose files it read, the strategy, the labels
-- it took as already known) so that it can be read back and compared.
create table selections (
    id uuid primary key,
    tenant_id uuid not null,
    dataset_id uuid not null references datasets (id) on delete cascade,
    model_id uuid not null,
    embed_job_id uuid not null,
    strategy text not null,
    budget integer not null check (budget >= 1),
    seed bigint not null,
    label_version integer not null,
    image_ids jsonb not null,
    created_at timestamptz not null default now()
);

create index selections_by_dataset on selections (dataset_id, created_at desc);
