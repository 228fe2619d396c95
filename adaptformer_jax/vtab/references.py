"""Published VTAB-1k rows the report sets beside a run (top-1 %, tasks in the standard order).

V-PETL Bench (Xin et al. 2024, arXiv 2408.08345), README table "Benchmark results of
image classification on VTAB", ViT-B/16 pre-trained on ImageNet-21K, repository
synbol/Parameter-Efficient-Transfer-Learning-Benchmark at c188fad (2024-08-19).
Its column order (CIFAR-100 ... SmallNORB/ele) is the standard one; its 'Mean' is the
mean over the 19 tasks (AdaptFormer 72.32; the mean of the three group means is 74.75).
"""
CITATION = ('V-PETL Bench (Xin et al. 2024), README VTAB table, ViT-B/16 IN-21k: '
            'github.com/synbol/Parameter-Efficient-Transfer-Learning-Benchmark @ c188fad')

V_PETL = {
    'full': (68.9, 87.7, 64.3, 97.2, 86.9, 87.4, 38.8, 79.7, 95.7, 84.2, 73.9, 56.3, 58.6,
             41.7, 65.5, 57.5, 46.7, 25.7, 29.1),
    'linear': (63.4, 85.0, 63.2, 97.0, 86.3, 36.6, 51.0, 78.5, 87.5, 68.6, 74.0, 34.3, 30.6,
               33.2, 55.4, 12.5, 20.0, 9.6, 19.2),
    'vpt_deep': (78.8, 90.8, 65.8, 98.0, 88.3, 78.1, 49.6, 81.8, 96.1, 83.4, 68.4, 68.5, 60.0,
                 46.5, 72.8, 73.6, 47.9, 32.9, 37.8),
    'lora': (67.1, 91.4, 69.4, 98.8, 90.4, 85.3, 54.0, 84.9, 95.3, 84.4, 73.6, 82.9, 69.2,
             49.8, 78.5, 75.7, 47.1, 31.0, 44.0),
    'adaptformer': (70.8, 91.2, 70.5, 99.1, 90.9, 86.6, 54.8, 83.0, 95.8, 84.4, 76.3, 81.9,
                    64.3, 49.3, 80.3, 76.3, 45.7, 31.7, 41.1),
}

# The 19-task means the table prints, to check a transcription against.
V_PETL_MEANS = {'full': 65.57, 'linear': 52.94, 'vpt_deep': 69.43, 'lora': 72.25,
                'adaptformer': 72.32}
