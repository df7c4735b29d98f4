-- A job that failed for a cause that may pass (a full disk, an unreachable
-- object store) waits before it is claimed again, longer at each attempt,
-- so that a passing fault does not spend every attempt at once.
alter table jobs add column retry_after timestamptz;
