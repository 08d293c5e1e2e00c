-- What the gateway answered when it took a message: the connect service says how it went
-- out (a WeChat customer-service or template message, a Weibo comment, ...). Added to the
-- archive too, at the same place, since rows move between them with INSERT ... SELECT *.
ALTER TABLE deliveries ADD COLUMN receipt text NOT NULL DEFAULT '';
ALTER TABLE deliveries_archive ADD COLUMN receipt text NOT NULL DEFAULT '';
