-- Evaluate jobs, and the report they (and pretrain jobs with an evaluation dataset) leave.

alter table jobs drop constraint jobs_kind_check;
alter table jobs add constraint jobs_kind_check check (kind in ('pretrain', 'finetune', 'evaluate'));
alter table jobs add column report jsonb;
