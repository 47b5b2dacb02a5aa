-- Daily usage and spend per tenant and model: what a billing job runs.
--
--   psql -v from=2025-05-01 -v to=2025-06-01 --csv -f daily.sql
--
-- from and to are UTC days (to excluded); days are UTC days, as the
-- partitions are.  model is the model as the client asked for it (an
-- alias stays an alias); tenant is NULL for requests without one.
--
--   requests    every request, answered or refused
--   errors      status 400 and above
--   *_tokens    as the backends reported them, or the gateway's estimate
--               for a stream that ended without usage (see estimated)
--   cost        US dollars, the gateway's price; NULL costs count as 0
--   unpriced    requests with no cost (a model without a price)
--   estimated   requests whose tokens are the gateway's estimates

SELECT (ts AT TIME ZONE 'UTC')::date                  AS day,
       tenant,
       model,
       count(*)                                       AS requests,
       count(*) FILTER (WHERE status >= 400)          AS errors,
       coalesce(sum(prompt_tokens), 0)                AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)            AS completion_tokens,
       coalesce(sum(cached_tokens), 0)                AS cached_tokens,
       coalesce(sum(cost), 0)                         AS cost,
       count(*) FILTER (WHERE cost IS NULL)           AS unpriced,
       count(*) FILTER (WHERE estimated)              AS estimated
  FROM infer_usage
 WHERE ts >= (:'from'::date)::timestamp AT TIME ZONE 'UTC'
   AND ts <  (:'to'::date)::timestamp AT TIME ZONE 'UTC'
 GROUP BY 1, 2, 3
 ORDER BY 1, 2 NULLS FIRST, 3;
