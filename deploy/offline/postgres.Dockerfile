# PostgreSQL from Debian's packages (already on the offline base), started the way the
# official image is: POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB create the cluster on
# first start, in /var/lib/postgresql/data.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
RUN chmod 0755 /usr/local/bin/postgres-entrypoint.sh \
 && ln -s /usr/lib/postgresql/*/bin/* /usr/local/bin/ 2>/dev/null || true
ENV PGDATA=/var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
