-- Tenants, their API keys, and the tenant that owns every dataset, job and model.
-- Rows that exist already go to the `default` tenant.

create table tenants (
    id uuid primary key,
    name text not null unique,
    created_at timestamptz not null default now()
);

create table api_keys (
    id uuid primary key,
    tenant_id uuid not null references tenants (id) on delete cascade,
    name text not null,
    prefix text not null,
    hash bytea not null unique,
    created_at timestamptz not null default now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);

create index api_keys_tenant_idx on api_keys (tenant_id);

insert into tenants (id, name) values (gen_random_uuid(), 'default');

alter table datasets add column tenant_id uuid references tenants (id);
alter table jobs add column tenant_id uuid references tenants (id);
alter table models add column tenant_id uuid references tenants (id);

update datasets set tenant_id = (select id from tenants where name = 'default');
update jobs set tenant_id = (select id from tenants where name = 'default');
update models set tenant_id = (select id from tenants where name = 'default');

alter table datasets alter column tenant_id set not null;
alter table jobs alter column tenant_id set not null;
alter table models alter column tenant_id set not null;

create index datasets_tenant_idx on datasets (tenant_id, created_at desc);
create index jobs_tenant_idx on jobs (tenant_id, created_at desc);
create index models_tenant_idx on models (tenant_id, created_at desc);
