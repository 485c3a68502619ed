"""The Celery task names: the one contract between the page (and the CLI), which send tasks by name, and the
workers, which register them. Neither side imports the other; both import these."""

TRAIN_TASK = "resnet_lab.train"
EVALUATE_TASK = "resnet_lab.evaluate"
PREDICT_BATCH_TASK = "resnet_lab.predict_batch"
DATA_ISSUES_TASK = "resnet_lab.data_issues"
LR_FIND_TASK = "resnet_lab.lr_find"
