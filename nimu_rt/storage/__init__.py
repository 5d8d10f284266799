"""Video storage: R2 through its S3 API, or local files; uploads and videos."""
