"""What a merged model records and how it is checked: lineage, model card, signing, release to S3 and verification."""
