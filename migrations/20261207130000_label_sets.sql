-- Labels sent after the upload, without re-uploading the images. Every
-- change makes a new version of a dataset's labels (version 0 is the
-- archive's own class folders, kept in the dataset's manifest); a version
-- is never changed once written. The dataset row's `labeled`, `classes` and
-- `class_counts` describe its latest version, `label_version`.
create table label_sets (
    dataset_id uuid not null references datasets (id) on delete cascade,
    version integer not null check (version >= 1),
    -- Class names, sorted; `labels` holds indices into it.
    classes jsonb not null,
    -- One class index, or null, per image in archive order.
    labels jsonb not null,
    labelled integer not null,
    -- Images whose label this version set or changed.
    changed integer not null,
    created_at timestamptz not null default now(),
    primary key (dataset_id, version)
);

alter table datasets add column label_version integer not null default 0;
